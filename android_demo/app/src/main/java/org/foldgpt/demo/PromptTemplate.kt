package org.foldgpt.demo

/**
 * The chat prompt template: the one place the app spells it.
 *
 * SmolLM2-Instruct's ChatML for a single user turn, with no system turn. (The model's own
 * Hugging Face chat_template inserts a default system turn when none is given; this template
 * deliberately does not, and the host twin `foldgpt chat` does the same.)
 *
 * TEMPLATE must equal android_demo/prompt_template.txt byte for byte, including the final
 * newline: that file is what the host twin reads, and tests/test_android_demo.py compares the
 * two. The user's text replaces PLACEHOLDER by a plain string replace (never a format call, so
 * braces in the user's text stay literal).
 */
object PromptTemplate {
    const val TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    const val PLACEHOLDER = "{prompt}"

    /**
     * End of an assistant turn (token id 2 in SmolLM2's tokenizer). The exporter records it as
     * an EOS id, so the runner stops on it; the runner may still stream its text first.
     */
    const val END_OF_TURN = "<|im_end|>"

    fun format(userText: String): String = TEMPLATE.replace(PLACEHOLDER, userText)

    /** The part of a streamed piece worth showing: the end-of-turn marker is dropped. */
    fun visible(piece: String): String = piece.replace(END_OF_TURN, "")
}

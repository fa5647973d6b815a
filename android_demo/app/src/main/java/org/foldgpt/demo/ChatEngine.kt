package org.foldgpt.demo

import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmGenerationConfig
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * The app's only contact with ExecuTorch (org.pytorch:executorch-android 1.5.1): check the
 * files, load a .pte (with its .ptd, if the export wrote one) and its tokenizer, run one
 * templated prompt while streaming the text, stop early, release. The host twin `foldgpt chat` runs the same loop in Python.
 *
 * Every member used here is listed in android_demo/executorch_android_api.txt, read from the
 * library's published sources. Values of ExecuTorch types are declared with their type written
 * out, so a reader sees which API each call uses.
 *
 * Threading: load, generate and close block; call them from one worker thread, never the UI
 * thread. stop may be called from any thread (LlmModule.stop() takes no lock in 1.5.1).
 */
class ChatEngine {

    /** Receives a generation's output, on the worker thread. */
    interface Listener {
        /** Generated text. The runner buffers tokens until they form valid UTF-8. */
        fun onText(piece: String)

        /** The runner's stats for the finished generation; null if they could not be parsed. */
        fun onStats(stats: RunStats?)
    }

    @Volatile
    private var module: LlmModule? = null

    val isLoaded: Boolean
        get() = module != null

    /**
     * Releases any loaded module, checks the files, creates the module and loads the program.
     * Returns null on success, else a message for the user; never throws.
     */
    fun load(modelPath: String, tokenizerPath: String, temperature: Float): String? {
        close()
        val problem = ModelFiles.check(modelPath, tokenizerPath)
        if (problem != null) return problem
        val dataPath = ModelFiles.dataFile(modelPath)
        // The native boundary can throw Errors as well as exceptions (UnsatisfiedLinkError on an
        // ABI the AAR does not ship, OutOfMemoryError for a model larger than the phone's RAM);
        // the demo reports them instead of crashing.
        val created: LlmModule = try {
            if (dataPath == null) {
                LlmModule(modelPath, tokenizerPath, temperature)
            } else {
                LlmModule(modelPath, tokenizerPath, temperature, dataPath)
            }
        } catch (t: Throwable) {
            return "Could not create the ExecuTorch module: " + describe(t)
        }
        try {
            // In 1.5.1 load() returns nothing and throws ExecutorchRuntimeException carrying the
            // runtime's error code when the program cannot be loaded.
            created.load()
        } catch (t: Throwable) {
            closeQuietly(created)
            return "ExecuTorch could not load $modelPath: " + describe(t) + "\n" +
                "Check that it was exported by this project with executorch==1.5.1 (the version " +
                "of this app's runtime) and that $tokenizerPath is the model's tokenizer."
        }
        module = created
        return null
    }

    /**
     * Runs one single-turn chat prompt and blocks until the model ends its turn (EOS),
     * maxNewTokens pieces have streamed, stop is called, or an error occurs.
     * Returns null on success, else a message for the user; never throws.
     */
    fun generate(userText: String, maxNewTokens: Int, temperature: Float, listener: Listener): String? {
        val m: LlmModule = module ?: return "Load a model first."
        val config: LlmGenerationConfig = LlmGenerationConfig.create()
            .echo(false)
            .temperature(temperature)
            .maxNewTokens(maxNewTokens)
            .build()
        val callback: LlmCallback = object : LlmCallback {
            private var pieces = 0

            override fun onResult(result: String) {
                val text = PromptTemplate.visible(result)
                if (text.isNotEmpty()) listener.onText(text)
                pieces += 1
                // generate(prompt, config, callback) does not pass maxNewTokens to the runner in
                // 1.5.1, so the cap is enforced here. A piece holds at least one token: this stops
                // after at least maxNewTokens tokens, more only when a character spans tokens.
                if (pieces >= maxNewTokens) m.stop()
            }

            override fun onStats(stats: String) {
                listener.onStats(RunStats.parse(stats))
            }
        }
        return try {
            // Each message is an independent single-turn prompt, as in the host twin: clear the
            // KV cache left by the previous message.
            m.resetContext()
            m.generate(PromptTemplate.format(userText), config, callback)
            null
        } catch (t: Throwable) {
            "Generation failed: " + describe(t)
        }
    }

    /** Asks a running generate to return early; safe from any thread. */
    fun stop() {
        val m: LlmModule? = module
        m?.stop()
    }

    /** Releases the native module. Call on the worker thread, after generate has returned. */
    fun close() {
        val m: LlmModule? = module
        module = null
        if (m != null) closeQuietly(m)
    }

    private fun closeQuietly(m: LlmModule) {
        try {
            m.close()
        } catch (e: IllegalStateException) {
            // close() refuses only while another LlmModule call is running, which cannot
            // happen on the single worker thread that makes them all.
        }
    }

    private fun describe(t: Throwable): String =
        t.javaClass.simpleName + ": " + (t.message ?: "no message")
}

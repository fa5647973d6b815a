package org.foldgpt.demo

import java.io.File
import org.json.JSONException
import org.json.JSONObject

/**
 * One generation's numbers as the ExecuTorch runner reports them in LlmCallback.onStats: a JSON
 * object written by extension/llm/runner/stats.h. Times are the runner's milliseconds.
 *
 * generated_tokens counts decode steps after the token that prefill sampled, the same count the
 * host twin reports, so the rates below are comparable with `foldgpt chat`.
 */
class RunStats(
    val promptTokens: Long,
    val generatedTokens: Long,
    val inferenceStartMs: Long,
    val promptEvalEndMs: Long,
    val firstTokenMs: Long,
    val inferenceEndMs: Long
) {
    /** Decode speed, the runner's own definition: generated tokens over the decode interval. */
    val decodeTokensPerSecond: Double?
        get() = rate(generatedTokens, inferenceEndMs - promptEvalEndMs)

    /** Prefill speed: prompt tokens over tokenization plus prefill. */
    val prefillTokensPerSecond: Double?
        get() = rate(promptTokens, promptEvalEndMs - inferenceStartMs)

    val timeToFirstTokenMs: Long
        get() = firstTokenMs - inferenceStartMs

    companion object {
        /** Parses the runner's stats JSON; null if a field is missing or the text is not JSON. */
        fun parse(json: String): RunStats? {
            return try {
                val o = JSONObject(json)
                RunStats(
                    o.getLong("prompt_tokens"),
                    o.getLong("generated_tokens"),
                    o.getLong("inference_start_ms"),
                    o.getLong("prompt_eval_end_ms"),
                    o.getLong("first_token_ms"),
                    o.getLong("inference_end_ms")
                )
            } catch (e: JSONException) {
                null
            }
        }

        private fun rate(tokens: Long, ms: Long): Double? =
            if (ms > 0 && tokens >= 0) tokens * 1000.0 / ms else null
    }
}

/**
 * Resident memory of this process, from /proc/self/status: VmRSS (resident now) and VmHWM
 * (peak resident). Both count the model's mmap'ed pages once they are touched, native heap
 * (XNNPACK's packed weights, KV cache) and the Java heap alike.
 */
object ProcessMemory {
    /** Values in kB by field name, e.g. "VmRSS"; empty if the file cannot be read. */
    fun statusKb(): Map<String, Long> {
        val values = HashMap<String, Long>()
        val lines = try {
            File("/proc/self/status").readLines()
        } catch (e: Exception) {
            return values
        }
        for (line in lines) {
            val colon = line.indexOf(':')
            if (colon <= 0) continue
            val fields = line.substring(colon + 1).trim().split(Regex("\\s+"))
            if (fields.size == 2 && fields[1] == "kB") {
                val kb = fields[0].toLongOrNull()
                if (kb != null) values[line.substring(0, colon)] = kb
            }
        }
        return values
    }
}

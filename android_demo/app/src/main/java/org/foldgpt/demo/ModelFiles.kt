package org.foldgpt.demo

import java.io.File
import java.io.FileInputStream
import java.io.IOException

/**
 * Checks the model and tokenizer files before ExecuTorch sees them, so that a wrong path or a
 * file that is not a .pte gives a sentence instead of a native error code.
 *
 * The exporter writes model.pte, tokenizer.json beside it and, for an 8-bit embedding, the
 * external weights model.ptd beside it too (export/executorch.py); the app follows the same
 * convention as the host twin: a .ptd with the .pte's stem next to it is part of the model.
 */
object ModelFiles {
    /**
     * Bytes 4..8 of a .pte are its flatbuffer file identifier: "ET" and the schema version
     * ("ET12" from executorch 1.5.1, see schema/program.fbs). Only the prefix is checked, so a
     * schema bump is left to the runtime to accept or refuse.
     */
    const val PTE_IDENTIFIER_PREFIX = "ET"

    /** Returns null when both files look usable, else a message for the user. */
    fun check(modelPath: String, tokenizerPath: String): String? {
        val modelProblem = readable(modelPath, "Model file")
        if (modelProblem != null) return modelProblem
        val tokenizerProblem = readable(tokenizerPath, "Tokenizer file")
        if (tokenizerProblem != null) return tokenizerProblem
        val data = dataFile(modelPath)
        if (data != null) {
            val dataProblem = readable(data, "External weights file")
            if (dataProblem != null) return dataProblem
        }
        val identifier = identifier(File(modelPath))
        if (identifier == null || !identifier.startsWith(PTE_IDENTIFIER_PREFIX)) {
            return "Not an ExecuTorch program: $modelPath\n" +
                "Bytes 4-8 of a .pte read \"ET12\"; this file has " +
                (if (identifier == null) "fewer than 8 bytes" else "\"$identifier\"") +
                ". Export it with: foldgpt export executorch runs/folded --out model.pte"
        }
        return null
    }

    private fun readable(path: String, what: String): String? {
        if (path.isBlank()) return "$what: no path given."
        val file = File(path)
        return when {
            !file.exists() -> "$what not found: $path\n" +
                "Push it with adb (android_demo/README.md, step 5) or correct the path."
            !file.isFile -> "$what is not a regular file: $path"
            !file.canRead() -> "$what exists but this app may not read it: $path\n" +
                "Copy it into the app's own directory (README, step 5)."
            file.length() == 0L -> "$what is empty: $path"
            else -> null
        }
    }

    /** The model's external weights, "<stem>.ptd" beside the .pte, if that file exists. */
    fun dataFile(modelPath: String): String? {
        val pte = File(modelPath)
        val ptd = File(pte.parentFile, pte.name.substringBeforeLast('.') + ".ptd")
        return if (ptd.exists()) ptd.path else null
    }

    /** Bytes of the .pte plus its .ptd, if any: what the model occupies in storage. */
    fun totalBytes(modelPath: String): Long {
        val data = dataFile(modelPath)
        return File(modelPath).length() + (if (data == null) 0L else File(data).length())
    }

    /** The 4-byte flatbuffer identifier of a .pte, or null if the file is shorter than 8 bytes. */
    fun identifier(file: File): String? {
        return try {
            FileInputStream(file).use { input ->
                val head = ByteArray(8)
                var filled = 0
                while (filled < head.size) {
                    val n = input.read(head, filled, head.size - filled)
                    if (n < 0) break
                    filled += n
                }
                if (filled < head.size) null else String(head, 4, 4, Charsets.US_ASCII)
            }
        } catch (e: IOException) {
            null
        }
    }
}

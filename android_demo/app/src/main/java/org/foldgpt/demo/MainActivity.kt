package org.foldgpt.demo

import android.app.Activity
import android.content.Context
import android.os.Bundle
import android.os.Debug
import android.os.Handler
import android.os.Looper
import android.os.SystemClock
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import java.util.Locale
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicInteger

/**
 * One screen: model settings, a transcript that streams the model's reply, and a stats line
 * (model file size, resident memory, tokens per second). All ExecuTorch work runs on [worker];
 * this class only reads settings and shows results.
 */
class MainActivity : Activity() {

    private val engine = ChatEngine()

    // load, generate and close run here, one after another, never on the UI thread.
    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private val ui = Handler(Looper.getMainLooper())

    private lateinit var modelPath: EditText
    private lateinit var tokenizerPath: EditText
    private lateinit var maxNewTokens: EditText
    private lateinit var temperature: EditText
    private lateinit var loadButton: Button
    private lateinit var sendButton: Button
    private lateinit var stopButton: Button
    private lateinit var prompt: EditText
    private lateinit var status: TextView
    private lateinit var stats: TextView
    private lateinit var transcript: TextView
    private lateinit var transcriptScroll: ScrollView

    private var busy = false
    private var modelBytes = -1L
    private var speed = ""

    private val memoryTicker = object : Runnable {
        override fun run() {
            showStats()
            ui.postDelayed(this, 1000)
        }
    }

    private class Settings(
        val modelPath: String,
        val tokenizerPath: String,
        val maxNewTokens: Int,
        val temperature: Float
    )

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        modelPath = findViewById(R.id.model_path)
        tokenizerPath = findViewById(R.id.tokenizer_path)
        maxNewTokens = findViewById(R.id.max_new_tokens)
        temperature = findViewById(R.id.temperature)
        loadButton = findViewById(R.id.load_button)
        sendButton = findViewById(R.id.send_button)
        stopButton = findViewById(R.id.stop_button)
        prompt = findViewById(R.id.prompt)
        status = findViewById(R.id.status)
        stats = findViewById(R.id.stats)
        transcript = findViewById(R.id.transcript)
        transcriptScroll = findViewById(R.id.transcript_scroll)

        val dir = modelDirectory()
        val prefs = getSharedPreferences(PREFS, Context.MODE_PRIVATE)
        modelPath.setText(prefs.getString(KEY_MODEL, File(dir, "model.pte").path))
        tokenizerPath.setText(prefs.getString(KEY_TOKENIZER, File(dir, "tokenizer.json").path))
        maxNewTokens.setText(prefs.getInt(KEY_MAX_NEW_TOKENS, DEFAULT_MAX_NEW_TOKENS).toString())
        temperature.setText(prefs.getFloat(KEY_TEMPERATURE, DEFAULT_TEMPERATURE).toString())

        loadButton.setOnClickListener { onLoad() }
        sendButton.setOnClickListener { onSend() }
        stopButton.setOnClickListener { engine.stop() }
        status.text = getString(R.string.status_not_loaded, dir.path)
        updateButtons()
    }

    override fun onResume() {
        super.onResume()
        ui.post(memoryTicker)
    }

    override fun onPause() {
        ui.removeCallbacks(memoryTicker)
        super.onPause()
    }

    override fun onDestroy() {
        engine.stop()
        worker.execute { engine.close() } // after any running generate has returned
        worker.shutdown()
        super.onDestroy()
    }

    /** Where the README's adb commands put the files: app-specific external storage. */
    private fun modelDirectory(): File = getExternalFilesDir(null) ?: filesDir

    private fun onLoad() {
        val settings = readSettings() ?: return
        busy = true
        updateButtons()
        status.text = getString(R.string.status_loading, settings.modelPath)
        worker.execute {
            val started = SystemClock.elapsedRealtime()
            val error = engine.load(settings.modelPath, settings.tokenizerPath, settings.temperature)
            val elapsed = SystemClock.elapsedRealtime() - started
            val bytes = ModelFiles.totalBytes(settings.modelPath)
            val data = ModelFiles.dataFile(settings.modelPath)
            val label = File(settings.modelPath).name + if (data == null) "" else " + " + File(data).name
            ui.post {
                busy = false
                if (error == null) {
                    modelBytes = bytes
                    status.text = getString(R.string.status_loaded, label, megabytes(bytes), elapsed)
                } else {
                    modelBytes = -1L
                    status.text = error
                }
                speed = ""
                updateButtons()
                showStats()
            }
        }
    }

    private fun onSend() {
        val text = prompt.text.toString().trim()
        if (text.isEmpty()) return
        val settings = readSettings() ?: return
        prompt.setText("")
        appendTranscript("\n\n" + getString(R.string.you) + " " + text + "\n" + getString(R.string.model) + " ")
        busy = true
        updateButtons()
        status.text = getString(R.string.status_generating)
        val pieces = AtomicInteger(0)
        val firstPieceAt = longArrayOf(0L)
        worker.execute {
            val error = engine.generate(text, settings.maxNewTokens, settings.temperature, object : ChatEngine.Listener {
                override fun onText(piece: String) {
                    val now = SystemClock.elapsedRealtime()
                    if (firstPieceAt[0] == 0L) firstPieceAt[0] = now
                    val n = pieces.incrementAndGet()
                    val seconds = (now - firstPieceAt[0]) / 1000.0
                    // Until the runner's stats arrive: streamed pieces per second, about one token each.
                    val live = if (n > 1 && seconds > 0) String.format(Locale.US, "~%.1f tok/s (live)", (n - 1) / seconds) else ""
                    ui.post {
                        appendTranscript(piece)
                        if (live.isNotEmpty()) speed = live
                        showStats()
                    }
                }

                override fun onStats(stats: RunStats?) {
                    val summary = if (stats == null) "" else describe(stats)
                    ui.post {
                        if (summary.isNotEmpty()) speed = summary
                        showStats()
                    }
                }
            })
            ui.post {
                busy = false
                status.text = error ?: getString(R.string.status_ready)
                updateButtons()
                showStats()
            }
        }
    }

    /** Reads and saves the settings fields; shows a message and returns null if one is invalid. */
    private fun readSettings(): Settings? {
        val maxNew = maxNewTokens.text.toString().trim().toIntOrNull()
        if (maxNew == null || maxNew < 1 || maxNew > MAX_NEW_TOKENS_LIMIT) {
            status.text = getString(R.string.error_max_new_tokens, MAX_NEW_TOKENS_LIMIT)
            return null
        }
        val temp = temperature.text.toString().trim().toFloatOrNull()
        if (temp == null || temp.isNaN() || temp < 0f || temp > 2f) {
            status.text = getString(R.string.error_temperature)
            return null
        }
        val settings = Settings(
            modelPath.text.toString().trim(), tokenizerPath.text.toString().trim(), maxNew, temp
        )
        getSharedPreferences(PREFS, Context.MODE_PRIVATE).edit()
            .putString(KEY_MODEL, settings.modelPath)
            .putString(KEY_TOKENIZER, settings.tokenizerPath)
            .putInt(KEY_MAX_NEW_TOKENS, settings.maxNewTokens)
            .putFloat(KEY_TEMPERATURE, settings.temperature)
            .apply()
        return settings
    }

    private fun updateButtons() {
        loadButton.isEnabled = !busy
        sendButton.isEnabled = !busy && engine.isLoaded
        stopButton.isEnabled = busy && engine.isLoaded
    }

    private fun appendTranscript(text: String) {
        transcript.append(text)
        transcriptScroll.post { transcriptScroll.fullScroll(ScrollView.FOCUS_DOWN) }
    }

    /** Model size, resident memory (VmRSS, peak VmHWM), native heap, last speed. */
    private fun showStats() {
        val memory = ProcessMemory.statusKb()
        val parts = ArrayList<String>()
        parts.add(if (modelBytes >= 0) "model " + megabytes(modelBytes) else "no model loaded")
        val rss = memory["VmRSS"]
        val peak = memory["VmHWM"]
        if (rss != null) parts.add("RSS " + megabytes(rss * 1024))
        if (peak != null) parts.add("peak RSS " + megabytes(peak * 1024))
        parts.add("native heap " + megabytes(Debug.getNativeHeapAllocatedSize()))
        if (speed.isNotEmpty()) parts.add(speed)
        stats.text = parts.joinToString("  ·  ")
    }

    private fun describe(s: RunStats): String {
        val parts = ArrayList<String>()
        val decode = s.decodeTokensPerSecond
        if (decode != null) parts.add(String.format(Locale.US, "%.1f tok/s decode", decode))
        val prefill = s.prefillTokensPerSecond
        if (prefill != null) parts.add(String.format(Locale.US, "%.0f tok/s prefill", prefill))
        parts.add("TTFT " + s.timeToFirstTokenMs + " ms")
        parts.add(s.promptTokens.toString() + " prompt / " + s.generatedTokens + " generated tokens")
        return parts.joinToString("  ·  ")
    }

    private fun megabytes(bytes: Long): String = String.format(Locale.US, "%.1f MB", bytes / 1e6)

    companion object {
        private const val PREFS = "foldgpt_demo"
        private const val KEY_MODEL = "model_path"
        private const val KEY_TOKENIZER = "tokenizer_path"
        private const val KEY_MAX_NEW_TOKENS = "max_new_tokens"
        private const val KEY_TEMPERATURE = "temperature"
        private const val DEFAULT_MAX_NEW_TOKENS = 128
        private const val MAX_NEW_TOKENS_LIMIT = 4096

        // Greedy by default, so a reply can be compared with `foldgpt chat` on the host.
        private const val DEFAULT_TEMPERATURE = 0.0f
    }
}

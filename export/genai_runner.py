"""ONNX Runtime GenAI on an exported ONNX folder: the runtime ONNX apps ship (`og.Model`,
`og.Generator`), reading the folder's genai_config.json.

    lm = GenaiLM("out/folded-onnx-fp32")
    new, stats = lm.generate(ids, 32)      # greedy token ids, and prefill / decode seconds

`OnnxLM` (export/onnx.py) is this project's own loop over the same graph; greedy tokens from
both must agree, which is what keeps genai_config.json honest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

INSTALL_HINT = "pip install onnxruntime-genai==0.18.0"
GENAI_CONFIG = "genai_config.json"  # written by export/onnx.py


class GenaiLM:
    def __init__(self, folder, num_threads: int | None = None):
        self.folder = Path(folder)
        if not (self.folder / GENAI_CONFIG).is_file():
            raise FileNotFoundError(f"{self.folder / GENAI_CONFIG}: no such file (not an ONNX export of this project)")
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise ValueError(f"ONNX Runtime GenAI is not installed: {INSTALL_HINT}") from None
        self.og = og
        genai = json.loads((self.folder / GENAI_CONFIG).read_text())
        self.max_length = int(genai["search"]["max_length"])  # the export's context
        eos = genai["model"].get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        config = og.Config(str(self.folder))
        if num_threads:  # the session's own option, over the folder's config
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": num_threads}}}}))
        try:
            self.model = og.Model(config)
        except Exception as e:  # og raises RuntimeError / OrtException: one line for the user
            raise ValueError(f"{self.folder}: ONNX Runtime GenAI cannot load it ({str(e).splitlines()[0]})") from None

    def generate(self, ids: Sequence[int], max_new_tokens: int, on_token: Callable[[int], None] | None = None
                 ) -> tuple[list[int], dict]:
        """Greedy tokens after `ids` (stops on the config's EOS ids or `max_new_tokens`), and timings."""
        if not len(ids):
            raise ValueError("nothing to prefill: the prompt has no tokens")
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens([list(map(int, ids))])
        t1, new = None, []
        while not generator.is_done():
            generator.generate_next_token()
            if t1 is None:
                t1 = time.perf_counter()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids:  # GenAI stops on it; like the other runners, not emitted
                break
            new.append(token)
            if on_token is not None:
                on_token(token)
        t2 = time.perf_counter()
        return new, {"prompt_tokens": len(ids), "generated_tokens": len(new),
                     "prefill_s": (t1 or t2) - t0, "decode_s": t2 - (t1 or t2)}

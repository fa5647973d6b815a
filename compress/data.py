"""Calibration and healing text, packed into fixed-length token sequences.

Sources: a local .txt / .jsonl / .parquet file, a Hugging Face dataset name (when a
hub is reachable), or `self`: text the dense model generates from varied seed prompts.
`self` is the offline default; it is what the model already believes, so calibrating
and healing on it asks the folded model to match the dense one rather than to learn
a new distribution. Generated text is cached on disk, keyed by everything that shapes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.outputs import exclusive, write_atomic

SELF = "self"
GEN_DTYPES = ("float32", "bfloat16")

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "how vaccines work", "the water cycle",
    "plate tectonics", "the history of the printing press", "machine learning", "the Roman Empire",
    "volcanoes", "honeybees", "the stock market", "climate change", "the human heart", "electricity",
    "the Moon landing", "ancient Egypt", "coral reefs", "the immune system", "renewable energy",
    "the theory of evolution", "the Industrial Revolution", "DNA", "the solar system", "rainforests",
    "the Great Wall of China", "earthquakes", "bread baking", "chess", "the Olympic Games",
    "gravity", "the internet", "music theory", "the Renaissance", "deserts", "sleep",
    "friendship", "a rainy day in a small town", "a lost dog finding its way home", "learning to ride a bike",
    "a dragon who is afraid of heights", "the first day at a new school", "a robot that learns to paint",
    "saving money", "healthy breakfast ideas", "how to plant tomatoes", "writing a good essay",
    "the causes of World War I", "the periodic table", "magnets", "the ocean tides", "clouds",
    "fractions", "the Pythagorean theorem", "prime numbers", "simple machines", "the five senses",
    "recycling", "the life cycle of a butterfly", "sound waves", "light and color",
]
STYLES = [
    "Explain {t} to a curious student.", "Write a short encyclopedia paragraph about {t}.",
    "Tell a short story about {t}.", "What are the most important facts about {t}?",
    "Describe {t} in simple words.", "Write a question and its answer about {t}.",
    "Give three interesting points about {t}, with a sentence on each.", "Why does {t} matter?",
]


@dataclass
class DataConfig:
    source: str = SELF  # 'self', a .txt/.jsonl/.parquet path, or a dataset name
    seq_len: int = 256
    num_sequences: int = 128
    seed: int = 0
    text_field: str = "text"  # column of .jsonl/.parquet/dataset rows
    split: str = "train"  # dataset split
    cache_dir: str | None = None  # where `self` text is cached; default ~/.cache/foldgpt
    gen_seed: int = 0  # generation seed for `self` text (seed above orders the packing)
    gen_max_new_tokens: int = 256
    gen_batch_size: int = 128  # the sampler's cost is per step, so wider batches amortise it (selftext_speed.md)
    gen_temperature: float = 0.8
    gen_dtype: str = "bfloat16"  # the sampler's dtype: 1.5x fp32's tokens/s at batch 32 here (AVX-512 BF16, selftext_speed.md)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.num_sequences < 1:
            raise ValueError(f"num_sequences must be at least 1, got {self.num_sequences}")
        if self.gen_max_new_tokens < 1 or self.gen_batch_size < 1:
            raise ValueError("gen_max_new_tokens and gen_batch_size must be positive")
        if self.gen_dtype not in GEN_DTYPES:
            raise ValueError(f"gen_dtype must be one of {', '.join(GEN_DTYPES)}, got {self.gen_dtype!r}")
        local = Path(self.source).suffix in (".txt", ".jsonl", ".json", ".parquet")
        if local and not Path(self.source).is_file():
            raise FileNotFoundError(f"{self.source}: no such data file")

    @property
    def num_tokens(self) -> int:
        return self.seq_len * self.num_sequences


def load_texts(cfg: DataConfig, model: nn.Module | None = None, tokenizer=None) -> list[str]:
    """Raw documents from the configured source."""
    if cfg.source == SELF:
        if model is None or tokenizer is None:
            raise ValueError("data source 'self' needs the dense model and its tokenizer")
        return self_generated(cfg, model, tokenizer)
    path = Path(cfg.source)
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        docs = [_field(r, cfg.text_field, path) for r in rows]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if cfg.text_field not in table.column_names:
            raise ValueError(f"{path}: no column {cfg.text_field!r} (columns: {table.column_names})")
        docs = [str(x) for x in table.column(cfg.text_field).to_pylist()]
    else:
        docs = _hub_dataset(cfg)
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise ValueError(f"{cfg.source}: no text found")
    return docs


def _field(row: dict, name: str, path: Path) -> str:
    if name not in row:
        raise ValueError(f"{path}: rows have no field {name!r} (fields: {sorted(row)})")
    return str(row[name])


def _hub_dataset(cfg: DataConfig) -> list[str]:
    try:
        from datasets import load_dataset

        ds = load_dataset(cfg.source, split=cfg.split)
    except Exception as e:  # no hub here, unknown name, ...: one line for the user
        raise FileNotFoundError(
            f"{cfg.source}: not a local .txt/.jsonl/.parquet file, and the dataset could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    if cfg.text_field not in ds.column_names:
        raise ValueError(f"{cfg.source}: no column {cfg.text_field!r} (columns: {ds.column_names})")
    return [str(x) for x in ds[cfg.text_field]]


def pack(docs: list[str], tokenizer, seq_len: int, num_sequences: int, seed: int = 0) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into `seq_len` windows, pick
    `num_sequences` of them in a seeded order. Returns LongTensor (num_sequences, seq_len).

    Raises ValueError when the text is too short for even one window.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n_windows = len(ids) // seq_len
    if n_windows < 1:
        raise ValueError(f"data too short: {len(ids)} tokens, need at least seq_len={seq_len}")
    windows = torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    if n_windows < num_sequences:  # reuse windows rather than fail: say how much is unique
        order = order.repeat((num_sequences + n_windows - 1) // n_windows)
    return windows[order[:num_sequences]]


def build_sequences(cfg: DataConfig, model: nn.Module | None = None, tokenizer=None) -> torch.Tensor:
    """The stage function: config -> packed token sequences (num_sequences, seq_len)."""
    return pack(load_texts(cfg, model, tokenizer), tokenizer, cfg.seq_len, cfg.num_sequences, cfg.seed)


def seed_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    combos = [s.format(t=t) for t in TOPICS for s in STYLES]
    rng.shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


def _model_fingerprint(model: nn.Module) -> str:
    """Identifies the weights cheaply: shapes plus a few sampled values."""
    h = hashlib.sha256()
    params = list(model.named_parameters())
    for name, p in params[:: max(1, len(params) // 8)]:
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:64].float().numpy().tobytes())
    return h.hexdigest()[:16]


def self_generated(cfg: DataConfig, model: nn.Module, tokenizer) -> list[str]:
    """Documents sampled from the dense model itself.

    One growing cache per (model, generation settings): a request for more tokens
    than cached continues the same seeded batch sequence, so calibration and healing
    sets drawn from one model share their documents instead of generating twice.
    A request returns the shortest prefix of the cache that covers it, so its
    sequences do not depend on how much other requests made the cache grow.
    One process at a time reads and grows it (a lock): a second waits, then reads.
    """
    key = dict(model=_model_fingerprint(model), seed=cfg.gen_seed, max_new=cfg.gen_max_new_tokens,
               batch=cfg.gen_batch_size, temperature=cfg.gen_temperature, v=3)  # v3: compress.data.sample
    if cfg.gen_dtype != "float32":  # another dtype, another text
        key["dtype"] = cfg.gen_dtype
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "foldgpt") / "self-text"
    file, meta_file = cache / f"{digest}.jsonl", cache / f"{digest}.json"
    with exclusive(cache / f"{digest}.lock", str(file), wait=True):
        return _grow_cache(cfg, model, tokenizer, file, meta_file, key)


def _grow_cache(cfg: DataConfig, model: nn.Module, tokenizer, file: Path, meta_file: Path, key: dict) -> list[str]:
    """The cached documents, grown by seeded generation until they cover the request."""
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() and file.is_file() else {"tokens": 0, "batches": 0}
    docs = [json.loads(line)["text"] for line in file.read_text().splitlines()][: meta.get("docs", 0)] if meta["batches"] else []
    target = int(cfg.num_tokens * 1.1)  # packing loses a partial window per document boundary
    # counted as pack() counts them (the decoded text re-tokenized), so the stopping rule
    # and the prefix agree however the cache grew
    counts = [_num_tokens(tokenizer, d) for d in docs]
    if sum(counts) >= target:
        return _prefix(docs, counts, target)

    bar = tqdm(total=target, initial=sum(counts), desc="generating self text", unit="tok")
    sampler = sampler_for(model, cfg)
    try:
        while sum(counts) < target:
            b = meta["batches"]
            prompts = seed_prompts(cfg.gen_batch_size * (b + 1), cfg.gen_seed)[-cfg.gen_batch_size:]
            for text, n in zip(*generate_batch(sampler, tokenizer, prompts, cfg, b)):
                if text:
                    docs.append(text)
                    counts.append(_num_tokens(tokenizer, text))
                    meta["tokens"] += n
                    bar.update(counts[-1])
            meta["batches"] += 1
            _write_cache(file, meta_file, docs, {**meta, **key})
    finally:
        bar.close()
    return _prefix(docs, counts, target)


def sampler_for(model: nn.Module, cfg: DataConfig) -> nn.Module:
    """The model that samples: itself in fp32, else a copy in `gen_dtype` (the caller's model stays as it is)."""
    dtype = getattr(torch, cfg.gen_dtype)
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


TOP_K, TOP_P = 50, 0.95  # transformers' default top-k and our top-p: the distribution every self text is drawn from


def nucleus(logits: torch.Tensor, temperature: float, top_k: int = TOP_K, top_p: float = TOP_P
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (B, k), token ids (B, k)) of temperature -> top-k -> top-p sampling, as
    transformers' warpers compute it, but on the k candidates only, not by sorting and sampling the
    whole vocabulary every step (1.94x transformers' generate at fp32 batch 32, benchmarks/results/selftext_speed.md)."""
    values, ids = (logits.float() / temperature).topk(min(top_k, logits.shape[-1]), dim=-1)  # descending
    p = values.softmax(-1)
    tail = p.flip(-1).cumsum(-1).flip(-1)  # mass of each candidate and every less likely one
    drop = tail <= 1 - top_p  # transformers' TopPLogitsWarper, read from the other end
    drop[:, 0] = False
    p = p.masked_fill(drop, 0)
    return p / p.sum(-1, keepdim=True), ids


def sample(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           temperature: float, stop: set[int], generator: torch.Generator) -> list[list[int]]:
    """Each row's sampled tokens (a stop token included, nothing after it). A row that stops
    leaves the batch (its cache rows too), so no step is spent on rows that are done."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    rows = torch.arange(input_ids.shape[0])
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    stop_ids = torch.tensor(sorted(stop))
    step, mask = input_ids, attention_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    for t in range(max_new_tokens):
        logits = model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        p, ids = nucleus(logits, temperature)
        nxt = ids.gather(1, torch.multinomial(p, 1, generator=generator))  # (rows, 1)
        for r, token in zip(rows.tolist(), nxt[:, 0].tolist()):
            out[r].append(token)
        going = ~torch.isin(nxt[:, 0], stop_ids)
        if t == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero()[:, 0]
            cache.batch_select_indices(keep)
            rows, nxt, mask = rows[keep], nxt[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        step, positions = nxt, mask.sum(-1, keepdim=True) - 1
    return out


def generate_batch(model: nn.Module, tokenizer, prompts: list[str], cfg: DataConfig, batch: int
                   ) -> tuple[list[str], list[int]]:
    """Batch number `batch` of seeded sampling: the texts, and the tokens each generated.
    The same seed, settings and torch build give the same texts."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer([_render(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    stop = {i for src in (model.generation_config.eos_token_id, tokenizer.eos_token_id) if src is not None
            for i in (src if isinstance(src, (list, tuple)) else [src])}
    generator = torch.Generator().manual_seed(cfg.gen_seed * 7919 + batch)
    with torch.no_grad():
        rows = sample(model, enc["input_ids"], enc["attention_mask"], cfg.gen_max_new_tokens, cfg.gen_temperature,
                      stop, generator)
    return ([tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows],
            [sum(t not in stop for t in r) for r in rows])


HELD_OUT_GEN_SEED = 1  # calibration and healing text use generation seed 0


def held_out_text(model: nn.Module, tokenizer, tokens: int = 8192) -> str:
    """Self-generated text that no stage trains, calibrates or selects on (another generation
    seed): perplexity on the healing text's own distribution, on any user's machine."""
    cfg = DataConfig(num_sequences=max(1, tokens // 256), seq_len=256, gen_seed=HELD_OUT_GEN_SEED)
    return "\n\n".join(load_texts(cfg, model, tokenizer))


def _num_tokens(tokenizer, doc: str) -> int:
    return len(tokenizer(doc, add_special_tokens=False)["input_ids"])


def _prefix(docs: list[str], counts: list[int], tokens: int) -> list[str]:
    """The first documents that hold `tokens` tokens (all of them if they hold fewer)."""
    total = 0
    for i, n in enumerate(counts):
        total += n
        if total >= tokens:
            return docs[: i + 1]
    return docs


def _write_cache(file: Path, meta_file: Path, docs: list[str], meta: dict) -> None:
    """Text first, then the meta that vouches for it; each replaced atomically."""
    write_atomic(file, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_atomic(meta_file, json.dumps({**meta, "docs": len(docs)}, indent=1))


def _render(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"

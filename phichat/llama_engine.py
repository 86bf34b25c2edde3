"""The local engine: llama.cpp loads a GGUF for a device and streams answers, with stats.

llama.cpp's own log goes to a file in the platform state dir (and to stderr with verbose): we
install our own `llama_log_set` callback and never let llama-cpp-python redirect fds 1/2, which
would blank a running TUI.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from phichat.config import APP_NAME, LOCAL_DEVICES, EngineSettings, Sampling
from phichat.engine import Finish, GenerationStats
from phichat.errors import PhichatError, UsageError

if TYPE_CHECKING:
    from llama_cpp import Llama

GGUF_MAGIC = b"GGUF"
REINSTALL_HINT = {
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python",
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python",
}

_log_state: dict[str, Any] = {}


def log_path() -> Path:
    """Where llama.cpp's log goes: <platform state dir>/phichat/llama.log."""
    from platformdirs import user_state_path

    return user_state_path(APP_NAME) / "llama.log"


def install_log_callback(verbose: bool = False) -> None:
    """Route llama.cpp's log to our log file (and stderr when verbose), once per process."""
    import llama_cpp

    _log_state["verbose"] = verbose
    if "callback" in _log_state:
        return
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = path.open("a", encoding="utf-8", errors="replace")

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        message = text.decode("utf-8", errors="replace")
        # llama.cpp may still log while the interpreter shuts down and the file is closed;
        # an exception can't cross into C, so a message that can't be written is dropped.
        with contextlib.suppress(OSError, ValueError):
            log_file.write(message)
            if _log_state["verbose"]:
                sys.__stderr__.write(message)

    _log_state["callback"] = callback  # keep a reference: ctypes must not collect it
    _log_state["file"] = log_file
    llama_cpp.llama_log_set(callback, None)


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def detect_device() -> str:
    """auto: metal on Apple silicon, cuda when llama.cpp can offload to a GPU, else cpu."""
    import platform

    if not gpu_offload_supported():
        return "cpu"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    return "cuda"


def check_device(device: str) -> None:
    """Refuse a GPU device the installed llama.cpp cannot use, with the reinstall command."""
    if device not in LOCAL_DEVICES:
        raise UsageError(f"unknown device {device!r}: choose one of {', '.join(LOCAL_DEVICES)}")
    if device != "cpu" and not gpu_offload_supported():
        raise UsageError(
            f"--device {device}: this llama-cpp-python build runs on the CPU only; "
            f"reinstall it with {REINSTALL_HINT[device]} (or use --device cpu)"
        )


def check_gguf(path: Path) -> None:
    """Fail early, in one line, on a missing, unreadable or non-GGUF model file."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise UsageError(f"{path}: model file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a GGUF model file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read model file ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise UsageError(f"{path}: not a GGUF model file")


class LlamaEngine:
    """One GGUF model loaded in llama.cpp (a ChatEngine). Thread-safe: calls into the model are
    serialised by a lock."""

    def __init__(self, llama: Llama, model_path: Path, device: str, settings: EngineSettings):
        self.llama = llama
        self.model_path = model_path
        self.device = device
        self.settings = settings
        self.model_label = model_path.name
        self.lock = threading.Lock()
        self._template = self._chat_template()
        self._folds_system = not self._template_keeps_system()

    @classmethod
    def load(
        cls, model_path: Path, device: str, settings: EngineSettings, verbose: bool = False
    ) -> LlamaEngine:
        """Load `model_path` for `device` with llama.cpp, keeping its log off the terminal."""
        check_gguf(model_path)
        check_device(device)
        install_log_callback(verbose)
        from llama_cpp import Llama

        threads = settings.thread_count()
        # verbose=True stops llama-cpp-python from redirecting fds 1/2 (which blanks a TUI);
        # its own Python-level prints go to the log instead of the terminal.
        with _python_prints_to_log():
            try:
                llama = Llama(
                    model_path=str(model_path),
                    n_ctx=settings.n_ctx,
                    n_batch=settings.batch,
                    n_ubatch=settings.batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=settings.n_gpu_layers,
                    flash_attn=settings.flash_attn,
                    verbose=True,
                )
            except (ValueError, RuntimeError) as exc:
                raise PhichatError(
                    f"{model_path}: llama.cpp could not load this model ({exc}); the file may be "
                    f"truncated or of an unsupported architecture (details in {log_path()})"
                ) from None
        llama.verbose = False  # after loading: no more prints from llama-cpp-python itself
        return cls(llama, model_path, device, settings)

    @property
    def n_ctx(self) -> int:
        """The context window in tokens (llama.cpp may pad its own; we keep to the asked size)."""
        return min(self.settings.n_ctx, self.llama.n_ctx())

    @property
    def gpu_layers(self) -> int:
        """How many layers run on the GPU (0 on the CPU)."""
        if self.device == "cpu":
            return 0
        n_layer = int(self.llama.metadata.get(f"{self._arch()}.block_count", 0) or 0)
        wanted = self.settings.n_gpu_layers
        return n_layer if wanted < 0 else min(wanted, n_layer)

    @property
    def device_label(self) -> str:
        """CPU, or the GPU backend with how many layers it runs."""
        if self.device == "cpu":
            return "CPU"
        return f"{self.device.upper()} ({self.gpu_layers} GPU layers)"

    def close(self) -> None:
        """Free the model and its context now rather than at garbage collection."""
        with self.lock:
            self.llama.close()

    def _arch(self) -> str:
        return self.llama.metadata.get("general.architecture", "")

    def _chat_template(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise PhichatError(
                f"{self.model_path.name} has no chat template (tokenizer.chat_template); "
                "phichat needs a chat model"
            )
        vocab = self.llama
        bos = vocab.detokenize([vocab.token_bos()], special=True).decode("utf-8", "replace")
        eos = vocab.detokenize([vocab.token_eos()], special=True).decode("utf-8", "replace")
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def _template_keeps_system(self) -> bool:
        """Whether the chat template renders system messages (Phi-3's silently drops them)."""
        probe = "phichat-system-probe"
        messages = [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}]
        try:
            return probe in self._template(messages=messages).prompt
        except Exception:  # noqa: BLE001 - a template that rejects system messages drops them
            return False

    def prepare(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Messages as the template will see them: a dropped system message is folded into
        the first user turn instead of being lost."""
        system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
        rest = [m for m in messages if m["role"] != "system"]
        if not system:
            return rest
        if not self._folds_system:
            return [{"role": "system", "content": "\n\n".join(system)}, *rest]
        folded = [dict(m) for m in rest]
        for message in folded:
            if message["role"] == "user":
                message["content"] = "\n\n".join([*system, message["content"]])
                break
        return folded

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of the chat prompt, generation prompt included."""
        rendered = self._template(messages=self.prepare(messages))
        with self.lock:
            return self.llama.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` with the model's own tokenizer."""
        with self.lock:
            return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as it is decoded; fill `stats` as it goes.

        Stops at an end-of-generation token, at max_tokens or the end of the window, or when
        `cancel` is set (checked on every token).
        """
        import llama_cpp

        stats = stats if stats is not None else GenerationStats()
        started = time.perf_counter()
        tokens = self.prompt_tokens(messages)
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise UsageError(
                f"the prompt is {len(tokens)} tokens; the context window is {self.n_ctx} "
                "(shorten the prompt or raise --ctx)"
            )
        budget = min(sampling.max_tokens, room)
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        stats.prompt_tokens, stats.seed, stats.finish = len(tokens), seed, Finish.LENGTH
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        leading = True
        with self.lock:
            llama = self.llama
            stats.cached_tokens = llama.longest_token_prefix(
                llama.input_ids[: llama.n_tokens], tokens
            )
            if not self._prefill(tokens, stats.cached_tokens, cancel):
                stats.finish = Finish.STOPPED
                return
            llama.set_seed(seed)
            llama.last_n_tokens_size = (
                sampling.repeat_last_n if sampling.repeat_last_n >= 0 else self.n_ctx
            )
            first_at = 0.0
            generator = llama.generate(
                tokens,
                top_k=0,
                top_p=sampling.top_p,
                min_p=0.0,
                temp=sampling.temperature,
                repeat_penalty=sampling.repeat_penalty,
            )
            try:
                for token in generator:
                    if stats.generated_tokens == 0:
                        first_at = time.perf_counter()
                        stats.ttft_s = first_at - started
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        stats.finish = Finish.END
                        break
                    stats.generated_tokens += 1
                    stats.decode_s = time.perf_counter() - first_at
                    text = decoder.decode(llama.detokenize([token]))
                    if leading:
                        text = text.lstrip()
                        leading = not text
                    if text:
                        yield text
                    if cancel is not None and cancel.is_set():
                        stats.finish = Finish.STOPPED
                        break
                    if stats.generated_tokens >= budget:
                        break
            finally:
                generator.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def _prefill(self, tokens: list[int], cached: int, cancel: threading.Event | None) -> bool:
        """Evaluate the prompt past its `cached` leading tokens, so generate() samples at once.

        A long prompt takes seconds on a CPU, so llama.cpp polls `cancel` between the nodes of
        its graph while it runs (an abort callback) and stops at once; False when it did. The
        callback is removed before decoding, where it would cost a Python call per node.
        """
        import llama_cpp

        llama = self.llama
        # The last token is always evaluated again: its logits are the ones to sample from.
        llama.n_tokens = min(cached, len(tokens) - 1)
        pending = tokens[llama.n_tokens :]  # eval() drops the stale rest of the cache first
        if cancel is None:
            llama.eval(pending)
            return True
        stop = llama_cpp.ggml_abort_callback(lambda _data: cancel.is_set())
        llama_cpp.llama_set_abort_callback(llama.ctx, stop, None)
        try:
            llama.eval(pending)
        except RuntimeError:  # llama_decode returned 2: aborted; the KV cache keeps what it did
            if not cancel.is_set():
                raise
        finally:
            llama_cpp.llama_set_abort_callback(llama.ctx, llama_cpp.ggml_abort_callback(), None)
        return not cancel.is_set()


@contextlib.contextmanager
def _python_prints_to_log() -> Iterator[None]:
    """Send llama-cpp-python's own print(..., file=sys.stderr) to the log (Python level only)."""
    sink: TextIO = _log_state.get("file") or io.StringIO()
    target = sys.__stderr__ if _log_state.get("verbose") else sink
    with contextlib.redirect_stderr(target):
        yield

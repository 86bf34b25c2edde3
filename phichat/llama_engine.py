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
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from phichat import __version__
from phichat.config import LOCAL_DEVICES, Device, EngineSettings, Sampling
from phichat.engine import Finish, GenerationStats, settled_tokens
from phichat.errors import PhichatError, UsageError
from phichat.kv_state import StateCache, signature
from phichat.paths import cache_dir, state_dir
from phichat.preflight import check_load

if TYPE_CHECKING:
    from llama_cpp import Llama

REINSTALL_HINT = {
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python",
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python",
}

KV_TYPE_IDS = {"f16": 1, "q8_0": 8}  # ggml_type values (GGML_TYPE_F16, GGML_TYPE_Q8_0)
TYPING_STEP = 32  # a read-ahead step shorter than this (typing, not a paste) runs on fewer threads

_log_state: dict[str, Any] = {}


def log_path() -> Path:
    """Where llama.cpp's log goes: llama.log in phichat's state folder."""
    return state_dir() / "llama.log"


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
            if _log_state["verbose"] and sys.__stderr__ is not None:
                sys.__stderr__.write(message)

    _log_state["callback"] = callback  # keep a reference: ctypes must not collect it
    _log_state["file"] = log_file
    llama_cpp.llama_log_set(callback, None)


def open_log() -> Path | None:
    """The log file this process writes (the first model load opens it), if any."""
    sink = _log_state.get("file")
    return Path(sink.name) if sink is not None else None


def log_line(message: str) -> None:
    """One line of phichat's own in llama.cpp's log (a state ignored, a save that failed)."""
    with contextlib.suppress(OSError, ValueError):
        sink = _log_state.get("file")
        if sink is not None:
            sink.write(f"phichat: {message}\n")
            sink.flush()


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def detect_device() -> Device:
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


class LlamaEngine:
    """One GGUF model loaded in llama.cpp (a ChatEngine). Thread-safe: calls into the model are
    serialised by a lock."""

    def __init__(
        self,
        llama: Llama,
        model_path: Path,
        device: Device,
        settings: EngineSettings,
        warnings: list[str] | None = None,
    ):
        self.llama = llama
        self.model_path = model_path
        self.device = device
        self.settings = settings
        self.model_label = model_path.name
        self._pending = list(warnings or [])  # what the user is told with the next notices
        self.lock = threading.Lock()
        self._template = self._chat_template()
        self._folds_system = not self._template_keeps_system()
        self._specials: tuple[str, ...] | None = None  # texts of the control tokens, once
        self.states = self._state_cache()
        self._holding: str | None = None  # the conversation whose tokens the context holds
        self._unsaved = False  # the context changed since its state was saved or loaded
        self._restored = 0  # tokens prepare() loaded, for the next answer's stats
        self._told: str | None = None  # the state problem the user was last told
        # the messages the last read-ahead read, with their settled tokens (_settled_tokens)
        self._settled: tuple[list[dict[str, str]], list[int]] | None = None

    @classmethod
    def load(
        cls, model_path: Path, device: Device, settings: EngineSettings, verbose: bool = False
    ) -> LlamaEngine:
        """Load `model_path` for `device` with llama.cpp, keeping its log off the terminal.

        Settings this model and machine cannot run are refused before llama.cpp allocates
        anything (phichat.preflight); a failure after that is blamed on the file only when
        llama.cpp could not read the model itself, not when it could not set up the context.
        """
        warnings = check_load(model_path, device, settings)
        check_device(device)
        install_log_callback(verbose)
        from llama_cpp import Llama

        threads = settings.thread_count()
        batch = min(settings.batch, settings.n_ctx)  # as llama.cpp clamps it, on both sides
        # verbose=True stops llama-cpp-python from redirecting fds 1/2 (which blanks a TUI);
        # its own Python-level prints go to the log instead of the terminal.
        with _python_prints_to_log():
            try:
                llama = Llama(
                    model_path=str(model_path),
                    n_ctx=settings.n_ctx,
                    n_batch=batch,
                    n_ubatch=batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=settings.n_gpu_layers,
                    flash_attn=settings.flash_attn,
                    type_k=KV_TYPE_IDS[settings.kv_type],
                    type_v=KV_TYPE_IDS[settings.kv_type],
                    verbose=True,
                )
            except (ValueError, RuntimeError) as exc:
                raise _load_error(exc, model_path, settings, batch) from None
        llama.verbose = False  # after loading: no more prints from llama-cpp-python itself
        return cls(llama, model_path, device, settings, warnings)

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
        """Save the conversation the context holds (and wait for the state being written),
        then free the model and its context now rather than at garbage collection."""
        with self.lock:
            self._save_held()
            if self.states is not None:
                self.states.wait()
            self.llama.close()

    def fork(self, parent: str, child: str) -> None:
        """Let `child`, a fork of `parent` with no saved state of its own, start from
        `parent`'s tokens: the context's, when it holds `parent` (whose state is saved first),
        else `parent`'s saved state."""
        with self.lock:
            if self.states is not None and self.states.find(child) is not None:
                return
            if self._holding == parent:
                self._save_held()
                self._holding, self._unsaved = child, True
            elif self.states is not None:
                self.states.share(parent, child)

    def forget(self, conversation: str) -> None:
        """Delete conversation `conversation`'s saved state (it was deleted)."""
        with self.lock:
            if self.states is not None:
                self.states.forget(conversation)
            if self._holding == conversation:
                self._holding, self._unsaved, self._restored = None, False, 0

    def _state_cache(self) -> StateCache | None:
        """Where conversation states are saved, when the settings give them room."""
        if self.settings.state_cache_mb <= 0:
            return None
        import llama_cpp

        model = self.model_path.resolve()
        stat = model.stat()
        sig = signature(
            str(model),
            stat.st_size,
            stat.st_mtime_ns,
            self.llama.n_ctx(),
            self.settings.kv_type,
            self.settings.flash_attn,
            self.device,
            self.gpu_layers,
            __version__,
            llama_cpp.__version__,
        )
        folder = cache_dir() / "kv-states"
        return StateCache(folder, sig, self.settings.state_cache_mb * 1_000_000, log_line)

    def take_notices(self, sampling: Sampling) -> list[str]:
        """What the load warned of (preflight), then a conversation state that could not be
        saved (an unwritable cache folder, a full disk): each said once. The answer was shown
        and saved all the same; only the next read is slower."""
        notices, self._pending = self._pending, []
        problem = self.states.problem if self.states is not None else None
        if problem is not None and problem != self._told:
            self._told = problem
            notices.append(f"{problem}; it will be read again next time")
        return notices

    def prepare(self, conversation: str | None) -> None:
        """Get ready to answer in `conversation` ahead of its next message: save the state of
        the conversation the context holds and load `conversation`'s (a switch in the app)."""
        with self.lock:
            self._restored += self._switch_to(conversation)

    def _switch_to(self, conversation: str | None, tokens: list[int] | None = None) -> int:
        """Make the context hold `conversation`: save the state of the one it held, then load
        `conversation`'s saved state, if it has one that shares more of the prompt `tokens`
        (when known) than the context does. Returns how many tokens were loaded."""
        if conversation == self._holding:
            return 0
        self._save_held()
        self._holding = conversation
        if conversation is None or self.states is None:
            return 0
        saved = self.states.tokens(conversation)
        if not saved:
            return 0
        llama = self.llama
        if tokens is not None:
            held = llama.longest_token_prefix(_held(llama), tokens)
            shared = llama.longest_token_prefix(saved, tokens)
            if shared <= held:
                log_line(
                    f"not loading the saved state of {conversation}: it shares {shared} of its "
                    f"{len(saved)} tokens with the prompt, the context {held}"
                )
                return 0
        loaded = self.states.load(llama.ctx, conversation, llama.n_ctx())
        llama.n_tokens = 0 if loaded is None else len(loaded)
        if loaded is None:
            return 0
        llama.input_ids[: len(loaded)] = loaded
        self._unsaved = False
        return len(loaded)

    def _save_held(self) -> None:
        """Save the state of the conversation the context holds, if it changed."""
        if self.states is None or self._holding is None or not self._unsaved:
            return
        llama = self.llama
        if llama.n_tokens > 0:
            import llama_cpp

            memory = llama_cpp.llama_get_memory(llama.ctx)
            llama_cpp.llama_memory_seq_rm(memory, 0, llama.n_tokens, -1)  # cells of a stopped read
            self.states.save(llama.ctx, self._holding, llama.input_ids[: llama.n_tokens].tolist())
        self._unsaved = False

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

    def _as_template_sees(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
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
        """The token ids of the chat prompt, generation prompt included.

        The template's own text is read with its control tokens (special=True); what a message
        says (typed, from a file, recalled, a past answer) is text, never a control token. A
        message whose text would make one (it holds `<|end|>`, `<|im_end|>`, `</s>`... or
        completes one with the template's text) is tokenized on its own with special=False;
        every other message stays inline in the template's text, so an ordinary prompt's ids
        are exactly those of the whole rendered prompt (SentencePiece and BPE merge across
        the joins, so splitting every message would change them, and with them the KV-cache
        prefix reuse and the saved states).
        """
        seen = self._as_template_sees(messages)
        rendered = self._template(messages=seen)
        add_bos = not rendered.added_special
        with self.lock:
            pieces = self._prompt_pieces(seen, rendered.prompt)
            if pieces is None:
                return self.llama.tokenize(
                    rendered.prompt.encode("utf-8"), add_bos=add_bos, special=True
                )
            tokens: list[int] = []
            for index, (text, special) in enumerate(pieces):
                tokens += self.llama.tokenize(
                    text.encode("utf-8"), add_bos=add_bos and index == 0, special=special
                )
            return tokens

    def _special_texts(self) -> tuple[str, ...]:
        """The texts llama.cpp reads as a control token with special=True (control and
        unknown tokens; user-defined ones are read as such whatever `special` says)."""
        if self._specials is None:
            import llama_cpp

            vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
            marks = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            texts = {
                self.llama.detokenize([token], special=True).decode("utf-8", "replace")
                for token in range(self.llama.n_vocab())
                if llama_cpp.llama_vocab_get_attr(vocab, token) & marks
            }
            self._specials = tuple(sorted(text for text in texts if text))
        return self._specials

    def _prompt_pieces(
        self, messages: list[dict[str, str]], prompt: str
    ) -> list[tuple[str, bool]] | None:
        """The prompt as (text, special) pieces to tokenize in turn, or None when no message's
        text touches a control token's text (the whole prompt is then read with special=True).

        The template is rendered again with a unique placeholder for each message's text, which
        tells the template's text from the messages'. A template that changes a message's text
        (trims it, say) can't be split exactly: a touched message's text is then put back as
        written.
        """
        specials = self._special_texts()
        if not any(special in prompt for special in specials):
            return None
        marker = f"\x00phichat-{uuid.uuid4().hex}-"
        stand_ins = [{**m, "content": f"{marker}{i}\x00"} for i, m in enumerate(messages)]
        parts = re.split(
            re.escape(marker) + r"(\d+)\x00", self._template(messages=stand_ins).prompt
        )
        # parts alternate: template text, message index, template text, ...
        spans: list[tuple[int, int, int]] = []  # (start, end, message index) in the prompt
        rebuilt: list[str] = []
        at = 0
        for position, part in enumerate(parts):
            text = messages[int(part)]["content"] if position % 2 else part
            if position % 2:
                spans.append((at, at + len(text), int(part)))
            rebuilt.append(text)
            at += len(text)
        joined = "".join(rebuilt)
        touched: set[int] = set()
        for special in specials:
            found = joined.find(special)
            while found >= 0:
                end = found + len(special)
                touched |= {i for start, stop, i in spans if found < stop and start < end}
                found = joined.find(special, found + 1)
        if not touched:
            return None
        pieces: list[tuple[str, bool]] = []
        inline = ""
        for position, text in enumerate(rebuilt):
            if position % 2 and int(parts[position]) in touched:
                pieces += [(inline, True)] if inline else []
                pieces.append((text, False))
                inline = ""
            else:
                inline += text
        pieces += [(inline, True)] if inline else []
        return pieces

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
        conversation: str | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as it is decoded; fill `stats` as it goes.

        Stops at an end-of-generation token, at max_tokens or the end of the window, or when
        `cancel` is set (checked on every token). `conversation` names the conversation the
        messages are from: its saved state is loaded when the context holds another one. A
        last message from the assistant is an answer cut short: its text follows the prompt
        (as text, in the tokens the model wrote it in, which the context or the saved state
        holds), and the answer goes on from there.
        """
        import llama_cpp

        stats = stats if stats is not None else GenerationStats()
        started = time.perf_counter()
        going_on = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        tokens = self.prompt_tokens(messages if going_on is None else messages[:-1])
        base = tokens[:]
        if going_on is not None:
            with self.lock:
                tokens += self._answer_tokens(going_on)  # as the tokenizer writes it, for now
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
        leading = going_on is None  # an answer's leading spaces are dropped, not a sequel's
        with self.lock:
            llama = self.llama
            restored = self._switch_to(conversation, tokens) + self._restored
            self._restored = 0
            if going_on is not None:
                tokens = base + self._as_written(base, going_on)
                stats.prompt_tokens = len(tokens)
                if len(tokens) >= self.n_ctx:
                    raise UsageError(
                        f"the answer fills the {self.n_ctx}-token context window: it cannot go"
                        " on (raise --ctx)"
                    )
                budget = min(budget, self.n_ctx - len(tokens))
            stats.cached_tokens = llama.longest_token_prefix(_held(llama), tokens)
            stats.restored_tokens = min(restored, stats.cached_tokens)
            self._unsaved = True
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

    def _answer_tokens(self, text: str) -> list[int]:
        """An answer's `text` as the tokenizer writes it (its leading space, which the answer
        lost, back where a SentencePiece vocabulary puts one)."""
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _text_tokens(self, text: str) -> list[int]:
        """`text` as tokens that follow others (a SentencePiece vocabulary would start it with
        a word's space if tokenized alone: it is tokenized after a line break, left out)."""
        llama = self.llama
        lead = llama.tokenize(b"\n", add_bos=False, special=False)
        ids = llama.tokenize(b"\n" + text.encode("utf-8"), add_bos=False, special=False)
        if ids[: len(lead)] == lead:
            return ids[len(lead) :]
        return llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _as_written(self, base: list[int], text: str) -> list[int]:
        """An answer's `text` after the prompt `base`, in the tokens the model wrote it in as
        far as the context holds them (all but the last, which was sampled, never read): a
        tokenizer could write the same text in other tokens, which would be read again."""
        llama = self.llama
        held = list(_held(llama))
        tail = held[len(base) :] if held[: len(base)] == base else []
        for end in range(len(tail), 0, -1):
            try:
                shown = llama.detokenize(tail[:end]).decode("utf-8").lstrip()
            except UnicodeDecodeError:  # a character cut in two: fewer tokens
                continue
            if text.startswith(shown):
                return tail[:end] + (
                    self._text_tokens(text[len(shown) :]) if text[len(shown) :] else []
                )
        return self._answer_tokens(text)

    def read_ahead(
        self,
        messages: list[dict[str, str]],
        cancel: threading.Event,
        conversation: str | None = None,
        limit: int | None = None,
    ) -> int:
        """Read the part of the prompt `messages` that text added to the last message cannot
        change into the KV cache, ahead of the answer (the message is still being typed); at
        most `limit` tokens of it (None: all).

        It reads in steps of up to n_batch tokens (llama.cpp's batch: each step is a graph of
        its own, so a paste read in small steps is read slower than a prompt), each under the
        engine lock and stopped at once, mid-step, by `cancel`. Held tokens that differ from
        the prompt (an edit before the read point) are dropped first; held tokens that run
        past it are kept. The answer never depends on it: `stream` reads whatever the cache
        does not share with its prompt. Returns how many tokens were read.
        """
        tokens = self._settled_tokens(messages)
        with self.lock:
            self._restored += self._switch_to(conversation, tokens)
        read = 0
        while not cancel.is_set() and (limit is None or read < limit):
            with self.lock:
                llama = self.llama
                at = llama.longest_token_prefix(_held(llama), tokens)
                if at == len(tokens):
                    break
                size = llama.n_batch if limit is None else min(llama.n_batch, limit - read)
                step = tokens[at : at + size]
                llama.n_tokens = at  # eval() drops the held tokens past it first
                self._unsaved = True
                with self._threads_for(len(step)):
                    if not self._eval(step, cancel):
                        break
                read += len(step)
        return read

    @contextlib.contextmanager
    def _threads_for(self, step: int) -> Iterator[None]:
        """Read a read-ahead step of `step` tokens shorter than TYPING_STEP (a few words typed)
        on one thread fewer, at least one: a small step is mostly llama.cpp's threads meeting
        after each graph node, and on a CPU other work wants, one thread descheduled stalls the
        others while the app waits for a core to show the next key (keystroke_latency.py). A
        paste or a moved cut, read in large steps, keeps every thread."""
        import llama_cpp

        llama = self.llama
        fewer = max(1, llama.n_threads - 1)
        if step >= TYPING_STEP or fewer == llama.n_threads:
            yield
            return
        llama_cpp.llama_set_n_threads(llama.ctx, fewer, fewer)
        try:
            yield
        finally:
            llama_cpp.llama_set_n_threads(llama.ctx, llama.n_threads, llama.n_threads_batch)

    def _settled_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's settled tokens (`engine.settled_tokens`), tokenized once for the same
        `messages` (a read-ahead in steps asks again at each step)."""
        if self._settled is not None and self._settled[0] == messages:
            return self._settled[1]
        settled = settled_tokens(messages, self.prompt_tokens)
        self._settled = ([dict(m) for m in messages], settled)
        return settled

    def _prefill(self, tokens: list[int], cached: int, cancel: threading.Event | None) -> bool:
        """Evaluate the prompt past its `cached` leading tokens, so generate() samples at once.

        A long prompt takes seconds on a CPU, so it is stopped at once by `cancel` (_eval);
        False when it was.
        """
        llama = self.llama
        # The last token is always evaluated again: its logits are the ones to sample from.
        llama.n_tokens = min(cached, len(tokens) - 1)
        return self._eval(tokens[llama.n_tokens :], cancel)  # eval() drops the stale rest first

    def _eval(self, pending: list[int], cancel: threading.Event | None) -> bool:
        """Evaluate `pending` after the context's tokens; False when `cancel` stopped it.

        llama.cpp polls `cancel` between the nodes of its graph (an abort callback) and stops
        at once; the context keeps the tokens of the batches done before. The callback is
        removed afterwards: while decoding it would cost a Python call per node.
        """
        import llama_cpp

        llama = self.llama
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


def _held(llama: Llama) -> Sequence[int]:
    """The tokens llama.cpp's context holds (a numpy view, read as a sequence of ints)."""
    return cast("Sequence[int]", llama.input_ids[: llama.n_tokens])


def _load_error(
    exc: Exception, model_path: Path, settings: EngineSettings, batch: int
) -> PhichatError:
    """One line for a failed load: the file's fault only where llama.cpp could not read it."""
    if str(exc).startswith("Failed to load model from file"):
        return PhichatError(
            f"{model_path}: llama.cpp could not load this model; the file may be truncated or "
            f"of an unsupported architecture (details in {log_path()})"
        )
    return PhichatError(
        f"llama.cpp could not set up a {settings.n_ctx}-token context (batch {batch}, "
        f"{settings.thread_count()} threads) for {model_path.name}: {exc}; try a smaller --ctx "
        f"or batch (details in {log_path()})"
    )


@contextlib.contextmanager
def _python_prints_to_log() -> Iterator[None]:
    """Send llama-cpp-python's own print(..., file=sys.stderr) to the log (Python level only)."""
    sink: TextIO = _log_state.get("file") or io.StringIO()
    target = sys.__stderr__ if _log_state.get("verbose") else sink
    with contextlib.redirect_stderr(target):
        yield

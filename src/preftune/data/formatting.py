"""Records → the exact text of the prompt and of each response.

Text records are used as they are (the tokenizer's BOS, if it adds one, goes before the prompt);
conversational records go through the chat template. The response text is the *remainder* of the
full conversation's render after the prompt's render (with the generation prompt), so

    render(prompt + response) == prompt_text + response_text

holds exactly; a template for which the prompt render is not a prefix of the full render is an
error, never a silently moved boundary. Prompt and responses are then tokenized separately, so the
prompt ids are the same for every response of a prompt and each response's token count is exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from preftune.data.schema import Message, Record, _wrap
from preftune.errors import ConfigError, DataError


@dataclass(frozen=True)
class FormatOptions:
    """How records become text.

    chat_template:     a Jinja chat template that replaces the tokenizer's own (CLI --chat-template FILE).
    use_chat_template: None = template for message lists, plain text as-is; True = also wrap text
                       records as one user turn and one assistant turn and template them; False =
                       never template (message lists are then an error). In a file mixing text and
                       message records, each record is formatted by its own form.
    add_eos:           append EOS to every response that does not already contain it.
    """

    chat_template: str | None = None
    use_chat_template: bool | None = None
    add_eos: bool = True

    def fingerprint(self) -> dict[str, Any]:
        return asdict(self)


def load_tokenizer(tokenizer: Any) -> Any:
    """Accept a tokenizer object or a folder / hub id (loaded with AutoTokenizer.from_pretrained)."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        from preftune.paths import pretrained_source

        source = pretrained_source(tokenizer, "model or tokenizer")
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot load a tokenizer from '{tokenizer}' ({err}) — give a folder "
                "with tokenizer files (save_pretrained) or a model folder"
            ) from err
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids or rendered text."""
    h = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps(
            [
                type(tokenizer).__name__,
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                getattr(tokenizer, "chat_template", None),
                _bos_prefix(tokenizer),
            ]
        ).encode()
    )
    return h.hexdigest()


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The BOS id the tokenizer puts before text by default ([] for GPT-2/Qwen style tokenizers)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids[:1] == [bos] else []


def read_template(chat_template: str | None) -> str | None:
    """A template given as text, or as the path of a file holding it."""
    if chat_template is None or "{" in chat_template:
        return chat_template
    path = Path(chat_template)
    if not path.is_file():
        raise ConfigError(
            f"chat template '{chat_template}' is neither Jinja text nor a file — give "
            "--chat-template FILE with a Jinja template"
        )
    return path.read_text(encoding="utf-8")


@dataclass
class Formatter:
    """Renders records of one tokenizer. Build with `Formatter.create`."""

    tokenizer: Any
    options: FormatOptions
    template: str | None
    bos_prefix: list[int]
    eos_id: int | None  # None only with add_eos=False
    use_backend: bool = False

    @classmethod
    def create(
        cls, tokenizer: Any, options: FormatOptions, *, conversational: bool, source: str = "data"
    ) -> Formatter:
        eos = tokenizer.eos_token_id
        if eos is None and options.add_eos:
            name = getattr(tokenizer, "name_or_path", "") or "given"
            raise ConfigError(
                f"the {name} tokenizer has no eos_token, so responses cannot end with one — add "
                "\"eos_token\" to its tokenizer_config.json (Python: tokenizer.eos_token = '...'), or "
                "train without EOS: --no-add-eos (YAML: add_eos: false)"
            )
        template = options.chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: use the default one
            template = template.get("default") or next(iter(template.values()))
        if conversational and options.use_chat_template is False:
            raise DataError(
                "records are message lists but use_chat_template=False",
                path=source,
                fix="allow the chat template, or give the prompt and responses as text",
            )
        if (conversational or options.use_chat_template) and not template:
            name = getattr(tokenizer, "name_or_path", "") or "given"
            what = (
                "records are conversational (message lists)" if conversational else "use_chat_template=True"
            )
            raise DataError(
                f"{what} but the {name} tokenizer has no chat template",
                path=source,
                fix="pass chat_template=... (CLI: --chat-template FILE with a Jinja template) or "
                "use a tokenizer that ships one",
            )
        return cls(
            tokenizer, options, template or None, _bos_prefix(tokenizer), eos, _backend_agrees(tokenizer)
        )

    def templated(self, rec: Record) -> bool:
        """Message lists always go through the template; text only when use_chat_template=True."""
        return rec.conversational or bool(self.options.use_chat_template)

    def render(self, rec: Record) -> tuple[str, list[str]]:
        """Return (prompt text, [response text, ...]) of one record.

        Raises DataError when the template fails on the record or its prompt render is not a
        prefix of the full render.
        """
        out = self.render_many([rec])[0]
        if isinstance(out, DataError):
            raise out
        return out

    def render_many(self, recs: list[Record]) -> list[tuple[str, list[str]] | DataError]:
        """`render` of many records, with two batched template calls; a record's problem is returned
        in its place (as a DataError naming its row and field), never raised."""
        out: list[tuple[str, list[str]] | DataError] = []
        todo: list[int] = []
        for i, rec in enumerate(recs):
            if self.templated(rec):
                todo.append(i)
                out.append(DataError("not rendered"))  # placeholder, replaced below
            else:
                out.append((str(rec.prompt), [str(r) for r in rec.responses]))
        if not todo:
            return out
        prompts = [_wrap(recs[i].prompt, "user") for i in todo]
        fulls = [p + _wrap(r, "assistant") for i, p in zip(todo, prompts) for r in recs[i].responses]
        try:
            prompt_texts = self._apply(prompts, add_generation_prompt=True)
            full_texts = self._apply(fulls, add_generation_prompt=False)
        except Exception as err:  # some record trips the template: find which, one by one
            if len(todo) == 1:
                out[todo[0]] = _template_failure(recs[todo[0]], err)
                return out
            for i in todo:
                out[i] = self.render_many([recs[i]])[0]
            return out
        j = 0
        for i, prompt_text in zip(todo, prompt_texts):
            rec = recs[i]
            responses = []
            for k in range(len(rec.responses)):
                full = full_texts[j + k]
                if not full.startswith(prompt_text):
                    out[i] = DataError(
                        "the chat template renders the prompt differently inside the full conversation, "
                        "so the response boundary is not exact",
                        row=rec.row,
                        field=_response_field(rec, k),
                        fix="use a template whose render of the prompt (with add_generation_prompt) is a "
                        "prefix of the full render (--chat-template FILE)",
                    )
                    break
                responses.append(full[len(prompt_text) :])
            else:
                out[i] = (prompt_text, responses)
            j += len(rec.responses)
        return out

    def _apply(self, conversations: list[list[Message]], *, add_generation_prompt: bool) -> list[str]:
        texts = self.tokenizer.apply_chat_template(
            conversations,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return [str(t) for t in texts]

    def encode(
        self, prompts: list[str], responses: list[str], templated: list[bool]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Tokenize prompts and responses in two batch calls, each text on its own.

        Templated text (`templated[i]`) carries its own special tokens; plain prompts get the
        tokenizer's BOS.
        Responses get EOS appended unless they already contain it (templates that end the
        assistant turn with EOS).
        """
        if not prompts:  # transformers fails on an empty batch
            return [], []
        enc = self._encode_batch(prompts + responses)
        p_ids, r_ids = enc[: len(prompts)], enc[len(prompts) :]
        if self.bos_prefix:
            p_ids = [ids if t else self.bos_prefix + ids for ids, t in zip(p_ids, templated)]
        eos = self.eos_id
        if self.options.add_eos and eos is not None:  # create() refused add_eos without an EOS
            r_ids = [ids if eos in ids else ids + [eos] for ids in r_ids]
        return p_ids, r_ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.use_backend:
            backend = self.tokenizer.backend_tokenizer
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])


def _backend_agrees(tokenizer: Any) -> bool:
    """Whether the Rust backend alone gives the ids of tokenizer(text, add_special_tokens=False).

    Calling it directly skips building offsets and attention masks (about a quarter of the time);
    a tokenizer with Python-side pre-processing keeps the ordinary call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    sample = [f"Hello  world 12, {tokenizer.eos_token or ''} é\n\tx", " leading space", ""]
    direct = [e.ids for e in backend.encode_batch(sample, add_special_tokens=False)]
    return bool(direct == list(tokenizer(sample, add_special_tokens=False)["input_ids"]))


def _template_failure(rec: Record, err: Exception) -> DataError:
    return DataError(
        f"the chat template fails on this record ({type(err).__name__}: {err})",
        row=rec.row,
        field="prompt",
        fix="check the roles and turn order this template accepts (--chat-template FILE to use another)",
    )


def _response_field(rec: Record, i: int) -> str:
    if rec.kind == "pairwise":
        return ("chosen", "rejected")[i]
    return "completion" if rec.kind == "unpaired" else f"responses[{i}]"

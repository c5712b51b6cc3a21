"""Preference data: read → records → validate → format → tokenize → cache.

The modules import in one direction only, each from the ones listed before it (a test checks it):

readers     rows (what a reader returns), tabular (Parquet, CSV, datasets), sources (any source)
records     layouts (field names, column mapping, ShareGPT / KTO / UltraFeedback layouts)
validation  checks (field checks), schema (the record kinds)
formatting  formatting (records → exact text), char_tokenizer (the tiny test tokenizer)
tokens      lengths (limits, truncation), tokenize (text → ids), cache (the tokenized-data cache), batching
built on them: transforms (records → new pairs), validate (`data check`), pipeline
(`prepare_examples`), show (`data show`),
commands (the CLI)
"""

# In dependency order: a module may import only modules listed before it.
MODULES: tuple[str, ...] = (
    "rows",
    "tabular",
    "sources",
    "layouts",
    "checks",
    "schema",
    "formatting",
    "char_tokenizer",
    "lengths",
    "tokenize",
    "cache",
    "batching",
    "transforms",
    "validate",
    "pipeline",
    "show",
    "commands",
)

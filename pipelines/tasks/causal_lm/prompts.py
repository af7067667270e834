"""Prompt/continuation records cut from real text (`lm.format: prompt_continuation`).

Each paragraph of a document (blocks separated by blank lines) with at least
`lm.prompt_words + lm.response_words` words gives one record: its first `lm.prompt_words` words
are the prompt, the next `lm.response_words` words the reference response (the text's own spacing
kept: the prompt ends with its last word, the response starts with the whitespace before its first,
as a byte-level BPE spells a word inside running text; prompt + response is a substring of the
paragraph). Documents are split into train / validation / test as whole
documents before they are cut (read_documents), so no article is in two splits. The records take
the path `lm.format: prompt_response` takes from there on, in both LM tasks.
"""

from __future__ import annotations

import re

WORD = re.compile(r"\S+")


def continuation(paragraph: str, prompt_words: int, response_words: int) -> tuple[str, str] | None:
    """(prompt, response) of one paragraph, or None when it has too few words."""
    words = list(WORD.finditer(paragraph))
    if len(words) < prompt_words + response_words:
        return None
    cut = words[prompt_words - 1].end()
    end = words[prompt_words + response_words - 1].end()
    return paragraph[words[0].start():cut], paragraph[cut:end]


def continuation_records(documents: list[str], prompt_words: int, response_words: int) -> list[tuple[int, str, str]]:
    """(passage number, prompt, response) for every long enough paragraph of the documents, in order;
    the passage number (1-based, within the split) is what an error about the record names."""
    out = []
    for doc in documents:
        for paragraph in re.split(r"\n\s*\n", doc):
            pair = continuation(paragraph.strip(), prompt_words, response_words)
            if pair is not None:
                out.append((len(out) + 1, *pair))
    return out

"""Cross-tokenizer distillation (issue 16): a teacher and a student with different vocabularies.

So far the data layer (`data.paired_blocks`: the same text tokenised by both sides) and the checks
(`checks.check_tokenizer_pair`); the Task that trains with sinkd.cross_vocab's losses comes next and
is not registered yet.
"""

"""The recipes behind the `sinkd` command, one job a file: job (train), tune (+ its search spaces),
compare, evaluate, export, submit; session starts or joins Ray for them."""

"""The kinds of checkpoint a card names (`kind`), torch-free: the server's telemetry reads
them without loading a model."""

RET_KIND = "ret"
PHRASE_BANK_KIND = "phrase_bank"

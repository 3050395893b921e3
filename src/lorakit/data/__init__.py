"""Training data for causal-LM fine-tuning: read, tokenise with loss masks, pack, batch.

    records = load_records("train.jsonl")              # JSONL/JSON/CSV/Parquet/datasets dir
    train, held_out = split_records(records, 0.05, seed=0)
    data = tokenize_records(train, tokenizer, max_seq_len=1024)
    rows = pack(data.examples, 1024)                   # optional
    batch = collate(rows[:8], pad_token_id(tokenizer))  # model(**batch, use_cache=False)
"""

from lorakit.data.collate import collate, pad_token_id
from lorakit.data.errors import DataError
from lorakit.data.formats import FORMATS, detect_format
from lorakit.data.packing import pack
from lorakit.data.readers import load_records
from lorakit.data.render import has_chat_template
from lorakit.data.split import split_records
from lorakit.data.tokenize import IGNORE, Example, TokenizedData, tokenize_records

__all__ = [
    "FORMATS",
    "IGNORE",
    "DataError",
    "Example",
    "TokenizedData",
    "collate",
    "detect_format",
    "has_chat_template",
    "load_records",
    "pack",
    "pad_token_id",
    "split_records",
    "tokenize_records",
]

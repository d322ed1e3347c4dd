"""Producer side: parse and validate input, enqueue batches, follow them."""

from promptq.producer.parsing import ParsedBatch, parse_items, parse_jsonl
from promptq.producer.producer import Batch, Producer, new_batch_id, parse_file

__all__ = [
    "Batch",
    "ParsedBatch",
    "Producer",
    "new_batch_id",
    "parse_file",
    "parse_items",
    "parse_jsonl",
]

"""Fixtures for the data tests: a byte-level tokenizer and parquet shards in the real layout."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


class ByteTokenizer:
    """The nanopipe.tokenizer methods the loader uses, over raw UTF-8 bytes; BOS = 256."""

    bos = 256

    def get_bos_token_id(self):
        return self.bos

    def get_vocab_size(self):
        return 257

    def _one(self, text, prepend, append):
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def encode(self, text, prepend=None, append=None, num_threads=8):
        if isinstance(text, str):
            return self._one(text, prepend, append)
        return [self._one(t, prepend, append) for t in text]

    __call__ = encode

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture
def make_shard():
    return write_shard


def write_shard(path, row_groups):
    """Write a parquet shard with a `text` column, one row group per list in `row_groups`."""
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for texts in row_groups:
            w.write_table(pa.table({"text": texts}, schema=schema))
    assert pq.ParquetFile(path).num_row_groups == len(row_groups)
    return path


@pytest.fixture(scope="session")
def real_tokenizer():
    """A tiny nanopipe BPE tokenizer (the real class the pipeline uses)."""
    from nanopipe.tokenizer import Tokenizer
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "hello world, hello parquet " * 4,
             "Packing documents into rows of tokens. "] * 10
    return Tokenizer.train_from_iterator(iter(texts), vocab_size=300)

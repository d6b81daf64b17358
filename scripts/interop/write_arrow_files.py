"""Writes one small table as Parquet and Arrow IPC with every compression pyarrow offers, and
with view-typed columns, for the data readers' interop test.

usage: write_arrow_files.py OUT_DIR

OUT_DIR/records.json holds the rows as pyarrow reads them back (`Table.to_pylist`): the records
every compressed file must read to. OUT_DIR/files.json lists the files written as
{"name", "compression"} (the codec asked of pyarrow), and
{"name", "view"} for files with string_view / binary_view columns.
"""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)

# Several hundred rows, so that compressed pages hold more than one repeated run.
n = 300
table = pa.table(
    {
        "text": [f"row {i}: " + "the quick brown fox " * (i % 7) for i in range(n)],
        "n": pa.array(range(n), pa.int64()),
        "score": [i / 8 for i in range(n)],
        "prompt": [{"text": f"question {i}", "lang": ["en", "fr"][i % 2]} for i in range(n)],
        "tags": [[f"t{j}" for j in range(i % 3)] for i in range(n)],
        "maybe": [None if i % 5 == 0 else f"m{i}" for i in range(n)],
    }
)
records = table.to_pylist()
(out / "records.json").write_text(json.dumps(records))

files = []


for codec in ["none", "snappy", "gzip", "brotli", "lz4", "lz4_raw", "zstd"]:
    name = f"{codec}.parquet"
    # Small pages: every codec decodes several pages per column.
    pq.write_table(table, out / name, compression=codec, data_page_size=1024)
    files.append({"name": name, "compression": codec})

for codec in ["uncompressed", "lz4", "zstd"]:
    name = f"{codec}.feather"
    feather.write_feather(table, out / name, compression=codec)
    files.append({"name": name, "compression": codec})
    name = f"{codec}.arrows"
    options = ipc.IpcWriteOptions(compression=None if codec == "uncompressed" else codec)
    with ipc.new_stream(out / name, table.schema, options=options) as writer:
        writer.write_table(table)
    files.append({"name": name, "compression": codec})

# pyarrow's default Feather compression is lz4: what a user's `write_feather(table, path)` gives.
default = table.slice(0, 10)
feather.write_feather(default, out / "default.feather")
files.append({"name": "default.feather", "compression": "default"})

# Parquet stores a string_view column as a plain string column; Arrow IPC keeps the view type.
strings = pa.table({"text": pa.array(["a", "b"], pa.string_view())})
pq.write_table(strings, out / "string_view.parquet")
files.append({"name": "string_view.parquet", "view": True})
for view in ["string_view", "binary_view"]:
    name = f"{view}.feather"
    values = ["a", "b"] if view == "string_view" else [b"a", b"b"]
    column = pa.array(values, getattr(pa, view)())
    feather.write_feather(pa.table({"text": column}), out / name, compression="uncompressed")
    files.append({"name": name, "view": True})

(out / "files.json").write_text(json.dumps(files))

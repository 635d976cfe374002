"""Listing a prefix of many keys (issue 11, item 4) on the real S3 test server: the prefix is split
into key prefixes, listed by separate Ray tasks, that together name every key exactly once, however
the names look. The reference is boto3's own paginated listing of the same prefix."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from raydeeplab import storage
from raydeeplab.batch import PATH, RELPATH, listing_units, read_inputs
from raydeeplab.config import PredictConfig

NAMES = (
    [f"img_{i:05d}.jpg" for i in range(60)]  # sequence numbers: split one digit a level
    + [hashlib.sha1(str(i).encode()).hexdigest()[:12] + ".png" for i in range(40)]  # hashes
    + [f"f{j}/x{i}.jpg" for j in range(4) for i in range(6)]  # folders
    + ["img_0", "a.jpg", "a.jpg.jpg"] + [f"a.jpg/b{i}.jpg" for i in range(6)]  # keys that are split prefixes
    + ["été/ü.jpg", "日本.jpg", "\U0001f600.jpg", "~tilde.jpg", "Z.JPG"]  # past ASCII, past the BMP
    + ["a\U0010ffff.jpg", "a\U0010ffffb.jpg", "\U0010ffff.jpg"]  # the character the split skips with
    + [".hidden.jpg", "readme.txt", ""]  # not images; "" is the folder marker in/
)


def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=Config(max_pool_connections=16))


def put_keys(bucket: str, keys: list[str]) -> None:
    client = s3_client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))


def boto3_listing(bucket: str, prefix: str) -> list[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [entry["Key"] for page in pages for entry in page.get("Contents", [])]


@pytest.mark.parametrize("want", [20, 10_000])
def test_a_split_prefix_names_every_key_once(bucket, want):
    name = bucket[len("s3://") :]
    put_keys(name, ["in/" + n for n in NAMES] + ["inx/other.jpg", "in"])  # share the string "in", not the folder
    keys, prefixes = storage.split_s3_prefix(name, "in/", want, page=5)
    listed = keys + [key for prefix in prefixes for key in storage.iter_s3_keys(name, prefix, page=5)]

    expected = boto3_listing(name, "in/")
    assert len(expected) == len(NAMES)
    assert sorted(listed) == sorted(expected)  # nothing missing, nothing twice
    assert listed[len(keys) :] == sorted(listed[len(keys) :])  # prefixes come in key order
    if want == 20:
        assert len(prefixes) >= 20
        assert not storage.s3_keys(name, prefixes[0], max_keys=5)[1]  # the first is one page
    else:  # split to the end: every prefix holds a page at most, and keys that are split prefixes stay
        assert max(len(storage.s3_keys(name, prefix, max_keys=1000)[0]) for prefix in prefixes) <= 5
        assert {"in/", "in/img_0", "in/a.jpg"} <= set(keys)


@pytest.mark.large  # 1,100 keys through Ray: half a minute of a CI run that must stay under 30
def test_a_flat_prefix_of_more_than_a_page_is_listed_by_many_tasks(ray_local, bucket):
    name = bucket[len("s3://") :]
    images = [f"in/{i:06d}.jpg" for i in range(storage.LIST_PAGE + 100)]
    put_keys(name, [*images, "in/notes.txt", "in/sub/deep.png"])
    units = listing_units(f"{bucket}/in", want=8)
    assert {kind for _, kind in units} == {"tree"} and len(units) > 2  # was one task listing it all
    first = units[0][0].split("/", 3)[3]  # listed first, split to one page: images are read early
    assert not storage.s3_keys(name, first)[1] and min(images) in storage.s3_keys(name, first)[0]

    rows = read_inputs(PredictConfig(input=f"{bucket}/in", output=f"{bucket}/out", model="tiny")).take_all()
    expected = [f"s3://{name}/{key}" for key in [*images, "in/sub/deep.png"]]
    assert sorted(row[PATH] for row in rows) == sorted(expected)
    assert sorted(row[RELPATH] for row in rows) == sorted(uri.split("/in/", 1)[1] for uri in expected)


def test_the_check_for_images_reads_one_page_of_a_large_prefix(bucket, monkeypatch):
    name = bucket[len("s3://") :]
    put_keys(name, [f"in/{i:06d}.txt" for i in range(storage.LIST_PAGE + 100)] + ["in/~last.jpg", "in/.hidden.png"])
    pages = []
    monkeypatch.setattr(storage, "s3_keys", lambda *a, real=storage.s3_keys, **k: pages.append(a) or real(*a, **k))
    assert storage.has_files(f"{bucket}/in", (".jpg",)) and len(pages) == 2  # the image is on page 2
    pages.clear()
    assert storage.has_files(f"{bucket}/in", (".txt",)) and len(pages) == 1  # fsspec's walk() listed all
    assert not storage.has_files(f"{bucket}/in", (".png",))  # hidden names do not count


# txt runs by default (with test_batch's manifest run); the Ray readers of the others with -m large
@pytest.mark.parametrize("kind", ["txt", pytest.param("csv", marks=pytest.mark.large), pytest.param("parquet", marks=pytest.mark.large)])
def test_manifests_are_read_by_ray_tasks_with_local_entries_resolved_against_the_driver(ray_local, bucket, tmp_path, monkeypatch, kind):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)  # relative entries are relative to where the user typed the command
    entries = [f"{bucket}/p/a.jpg", "rel/b.png", "../up.jpg", str(tmp_path / "abs.jpg"), f"file://{tmp_path}/c.jpg"]
    expected = [f"{bucket}/p/a.jpg", str(tmp_path / "rel/b.png"), str(tmp_path.parent / "up.jpg"), str(tmp_path / "abs.jpg"), str(tmp_path / "c.jpg")]
    manifest = f"{bucket}/lists/m.{kind}"
    if kind == "txt":
        storage.write_bytes(manifest, ("\n".join(f"  {e} " for e in entries) + "\n\n").encode())  # blank lines, spaces
    else:
        table = pa.table({"id": list(range(len(entries))), "path": entries})  # the `path` column, not the first
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink) if kind == "parquet" else pacsv.write_csv(table, sink)
        storage.write_bytes(manifest, sink.getvalue().to_pybytes())

    rows = read_inputs(PredictConfig(input=manifest, output=str(tmp_path / "out"), model="tiny")).take_all()
    assert sorted(row[PATH] for row in rows) == sorted(expected)
    assert sorted(row[RELPATH] for row in rows) == sorted(e.split("://", 1)[-1].lstrip("/") for e in expected)


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_a_long_manifest_is_read_in_chunks_that_add_up_to_pyarrows_whole_read(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from raydeeplab.data.manifests import iter_manifest

    entries = [f"s3://b/p/{i:07d} x.jpg" for i in range(150_000)]  # a space: a text line is one value
    manifest = tmp_path / f"m.{kind}"
    if kind == "txt":
        manifest.write_text("\n".join(entries) + "\n")
        reference = manifest.read_text().splitlines()
    else:
        table = pa.table({"id": range(len(entries)), "path": entries})
        pq.write_table(table, manifest) if kind == "parquet" else pacsv.write_csv(table, manifest)
        reference = (pq.read_table if kind == "parquet" else pacsv.read_csv)(manifest).column("path").to_pylist()

    chunks = [chunk["path"] for chunk in iter_manifest(str(manifest), ("path",), rows=65536)]
    assert [v for chunk in chunks for v in chunk] == reference == entries
    assert len(chunks) >= 3 and max(map(len, chunks)) <= 65536  # never the whole list at once


def test_manifests_read_their_path_column_as_written(tmp_path):
    """What users' lists hold: a CSV whose other column looks numeric for its first block and
    then holds text (the read ended mid-job, and again on every rerun), ids that look like
    numbers, a BOM and CRLF lines, Parquet BINARY paths; and a missing ``path`` column or a
    non-UTF-8 list fail naming the file (the first column was taken, or a raw decode error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydeeplab.data.manifests import ManifestError, read_manifest

    rows = [f"imgs/{i:04d}.jpg,{i % 7}" for i in range(60_000)] + ["imgs/last.jpg,unknown"]
    (tmp_path / "typed.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    paths = read_manifest(str(tmp_path / "typed.csv"), ("path",))["path"]
    assert len(paths) == 60_001 and paths[-1] == "imgs/last.jpg"
    (tmp_path / "ids.csv").write_text("path\n0001\n0002\n")
    assert read_manifest(str(tmp_path / "ids.csv"), ("path",)) == {"path": ["0001", "0002"]}
    (tmp_path / "bom.txt").write_bytes("\ufeffimgs/a.jpg\r\nimgs/b.jpg\r\n".encode())
    assert read_manifest(str(tmp_path / "bom.txt"), ("path",)) == {"path": ["imgs/a.jpg", "imgs/b.jpg"]}
    pq.write_table(pa.table({"path": pa.array([b"s3://b/in/a.jpg"], pa.binary())}), tmp_path / "binary.parquet")
    assert read_manifest(str(tmp_path / "binary.parquet"), ("path",)) == {"path": ["s3://b/in/a.jpg"]}

    (tmp_path / "no-path.csv").write_text("id, path\n1,a.jpg\n")
    pq.write_table(pa.table({"id": [1], "image_path": ["a.jpg"]}), tmp_path / "no-path.parquet")
    for name, header in (("no-path.csv", "'id', ' path'"), ("no-path.parquet", "'id', 'image_path'")):
        with pytest.raises(ManifestError, match=f"{name}: no column path \\(its header: {header}\\)"):
            read_manifest(str(tmp_path / name), ("path",))
    (tmp_path / "utf16.txt").write_text("imgs/a.jpg\n", encoding="utf-16")
    with pytest.raises(ManifestError, match="utf16.txt: line 1 is not UTF-8 text"):
        read_manifest(str(tmp_path / "utf16.txt"), ("path",))


def test_one_image_as_input_keeps_its_name_below_output(tmp_path, bucket):
    """Its path below itself is "": the mask was masks/.png, hidden, and the next such run's
    mask replaced it."""
    import numpy as np

    from raydeeplab.batch import list_unit

    storage.write_bytes(str(tmp_path / "p1.jpg"), b"x")
    storage.write_bytes(f"{bucket}/one/p1.jpg", b"x")
    for root in (str(tmp_path / "p1.jpg"), f"{bucket}/one/p1.jpg"):
        units = listing_units(root, 8)
        assert units == [(root, "file")]
        rows = list_unit({"unit": np.array([units[0][0]]), "kind": np.array([units[0][1]])}, root)
        assert list(rows[PATH]) == [root] and list(rows[RELPATH]) == ["p1.jpg"]


def test_linked_folders_at_any_depth_are_listed_and_a_loop_ends(tmp_path):
    """fsspec's find() listed a link to a folder below the top level as one file, which the image
    filter dropped, while the images check followed it: those images were lost without a word.
    A link back to an ancestor must not loop."""
    from raydeeplab.batch import list_unit

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "p1.jpg").write_bytes(b"x")
    root = tmp_path / "in"
    (root / "2024").mkdir(parents=True)
    (root / "2024" / "cam1").symlink_to(tmp_path / "elsewhere")
    (root / "cam0").symlink_to(tmp_path / "elsewhere")
    (root / "2024" / "back").symlink_to(root)  # a loop
    listed = set()
    for unit, kind in listing_units(str(root), 8):
        import numpy as np

        listed |= set(list_unit({"unit": np.array([unit]), "kind": np.array([kind])}, str(root))[RELPATH])
    assert {"2024/cam1/p1.jpg", "cam0/p1.jpg"} <= listed
    assert storage.has_files(str(root / "2024"), (".jpg",))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "self").symlink_to(tmp_path / "empty")
    assert not storage.has_files(str(tmp_path / "empty"), (".jpg",))
    assert storage.list_files(str(tmp_path / "empty")) == []

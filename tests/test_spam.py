"""The SMS spam pipeline on the real UCI file: the book's split, loaders, errors, download and extraction."""

from __future__ import annotations

import io
import zipfile

import pandas as pd
import pytest
import torch
from test_download import LoopbackServer  # the loopback HTTP server of the downloader's tests

from gptlora import spam
from gptlora.formats import spam_file as raw_file  # the module; `spam_file` is the fixture (the UCI file)
from gptlora.infra.download import OfflineError
from gptlora.spam import SpamDataset, create_dataloaders, prepare_spam_data, read_sms_spam


@pytest.fixture(scope="module")
def splits(tmp_path_factory, spam_file):
    """The three parquet splits, prepared once for this module from the local UCI file."""
    return prepare_spam_data(tmp_path_factory.mktemp("spam"), source=spam_file)


@pytest.fixture(scope="module")
def loaders(splits, tokenizer):
    return create_dataloaders(splits["train"].parent, tokenizer)


def uci_zip(spam_file, member="sms+spam+collection/SMSSpamCollection") -> bytes:
    """A zip holding the UCI file (under a folder, as archives often do) and a readme."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme", "SMS Spam Collection v.1\n")
        archive.writestr(member, spam_file.read_bytes())
    return buffer.getvalue()


def test_raw_file_has_the_documented_counts(spam_file):
    df = read_sms_spam(spam_file)
    assert len(df) == 5572
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}


def test_split_is_the_books_row_for_row(splits):
    frames = {name: pd.read_parquet(path) for name, path in splits.items()}
    assert {name: len(frame) for name, frame in frames.items()} == {"train": 1045, "validation": 149, "test": 300}
    counts = {name: frame["Label"].value_counts().sort_index().tolist() for name, frame in frames.items()}
    assert counts == {"train": [528, 517], "validation": [70, 79], "test": [149, 151]}  # [ham, spam]
    assert frames["train"]["Text"].tolist()[:3] == [
        "Dude how do you like the buff wind.",
        "Tessy..pls do me a favor. Pls convey my birthday wishes to Nimya..pls dnt forget it. Today is her birthday Shijas",
        "Reminder: You have not downloaded the content you have already paid for. Goto http://doit. mymoby. tv/ to collect your content.",
    ]
    assert frames["validation"]["Text"].iloc[0].startswith("Mila, age23, blonde, new in UK. I look s")
    assert frames["test"]["Text"].iloc[0] == "85233 FREE>Ringtone!Reply REAL"


def test_prepare_is_idempotent_and_never_downloads_again(splits, monkeypatch):
    before = {name: path.stat().st_mtime_ns for name, path in splits.items()}
    monkeypatch.setenv("GPTLORA_OFFLINE", "1")  # any download attempt would raise OfflineError
    monkeypatch.delenv("GPTLORA_SPAM_SOURCE", raising=False)
    again = prepare_spam_data(splits["train"].parent)
    assert again == splits
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == before


def test_loaders_have_the_books_batches(loaders):
    train, val, test = loaders
    assert (len(train), len(val), len(test)) == (130, 19, 38)
    assert train.dataset.max_length == val.dataset.max_length == test.dataset.max_length == 120
    ids, labels = next(iter(train))
    assert ids.shape == (8, 120) and labels.shape == (8,)
    assert ids.dtype == labels.dtype == torch.long
    assert len(list(test)[-1][1]) == 300 - 37 * 8  # validation and test keep their last, smaller batch


def test_shuffling_is_reproducible_under_a_seed(loaders):
    def first_labels(seed):
        torch.manual_seed(seed)
        return torch.cat([labels for _, labels in loaders[0]])

    assert torch.equal(first_labels(123), first_labels(123))
    assert not torch.equal(first_labels(123), first_labels(124))


def test_dynamic_padding_pads_each_batch_to_its_longest_text(splits, tokenizer, loaders):
    train, _, _ = create_dataloaders(splits["train"].parent, tokenizer, dynamic_padding=True)
    lengths = [len(ids) for ids in train.dataset.encoded_texts]
    assert round(sum(lengths) / len(lengths), 1) == 30.4  # vs 120 for every row with the book's padding
    torch.manual_seed(123)
    fixed = list(loaders[0])
    torch.manual_seed(123)
    for (ids, labels, row_lengths), (fixed_ids, fixed_labels) in zip(train, fixed):  # same seed, same rows
        assert ids.shape[1] == int(row_lengths.max()) <= 120
        assert torch.equal(labels, fixed_labels)
        assert torch.equal(ids, fixed_ids[:, : ids.shape[1]])  # same tokens, just less padding
        assert (fixed_ids[:, ids.shape[1]:] == 50256).all()


def test_dataset_truncates_to_max_length_and_rejects_wrong_columns(tokenizer):
    frame = pd.DataFrame({"Label": [0, 1], "Text": ["hi", "one two three four five six"]})
    dataset = SpamDataset(frame, tokenizer, max_length=3)
    assert [dataset[i][0].tolist() for i in range(2)] == [tokenizer.encode("hi") + [50256] * 2,
                                                          tokenizer.encode("one two three")]
    with pytest.raises(ValueError, match="expected columns 'Label' and 'Text'"):
        SpamDataset(frame.rename(columns={"Text": "message"}), tokenizer)


@pytest.mark.parametrize("content, problem", [
    (b"ham\tfine\nham\n", r"line 2: expected 2 tab-separated columns .* found 1"),
    (b"ham\tfine\nham\ta\tb\n", r"line 2: expected 2 tab-separated columns .* found 3"),
    (b"ham\tfine\nspma\tWIN\n", r"line 2: unknown label 'spma'"),
    (b"ham\tfine\nspam\t  \n", r"line 2: empty text"),
    (b"ham\tfine\nham\tok\nham\tcaf\xe9\n", r"line 3: not UTF-8"),
])
def test_malformed_files_name_file_line_and_problem(tmp_path, content, problem):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as error:
        read_sms_spam(path)
    assert str(path) in str(error.value)


def test_only_newlines_end_a_message(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes("ham\tpage\x0cbreak and line\u2028separator\r\nspam\tWIN\n".encode())
    assert read_sms_spam(path).values.tolist() == [["ham", "page\x0cbreak and line\u2028separator"], ["spam", "WIN"]]


def test_a_file_that_is_not_ucis_is_used_with_a_warning(tmp_path):
    source = tmp_path / "mine.tsv"
    source.write_text("".join(f"ham\tmessage {i}\nspam\tWIN {i}\n" for i in range(10)))
    with pytest.warns(UserWarning, match="split will differ from the book's"):
        paths = prepare_spam_data(tmp_path / "data", source=source)
    assert sum(len(pd.read_parquet(path)) for path in paths.values()) == 20


def test_download_falls_back_to_the_mirror_extracts_and_verifies(tmp_path, spam_file, splits, monkeypatch):
    monkeypatch.delenv("GPTLORA_SPAM_SOURCE", raising=False)
    monkeypatch.delenv("GPTLORA_OFFLINE", raising=False)
    with LoopbackServer({"/mirror/spam.zip": uci_zip(spam_file)}) as server:
        monkeypatch.setenv("GPTLORA_SPAM_URL", f"{server.url}/gone/spam.zip,{server.url}/mirror/spam.zip")
        paths = prepare_spam_data(tmp_path)
        assert [path for path, _ in server.requests] == ["/gone/spam.zip", "/mirror/spam.zip"]
    assert (tmp_path / "SMSSpamCollection").read_bytes() == spam_file.read_bytes()
    for name in paths:
        assert pd.read_parquet(paths[name]).equals(pd.read_parquet(splits[name]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary files left behind
        "SMSSpamCollection", "sms_spam_collection.zip", "spam_splits.json", "test.parquet", "train.parquet",
        "validation.parquet"]


def test_a_downloaded_file_that_is_not_ucis_is_rejected_and_deleted(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTLORA_SPAM_SOURCE", raising=False)
    monkeypatch.delenv("GPTLORA_OFFLINE", raising=False)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("SMSSpamCollection", "ham\tnot the real file\n")
    with LoopbackServer({"/spam.zip": buffer.getvalue()}) as server:
        monkeypatch.setenv("GPTLORA_SPAM_URL", f"{server.url}/spam.zip")
        with pytest.raises(ValueError, match="is not UCI's file"):
            prepare_spam_data(tmp_path)
    assert sorted(tmp_path.iterdir()) == []  # extracted file, zip and splits: nothing kept


def test_offline_without_a_source_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTLORA_SPAM_SOURCE", raising=False)
    monkeypatch.setenv("GPTLORA_OFFLINE", "1")
    with pytest.raises(OfflineError, match="GPTLORA_SPAM_SOURCE"):
        prepare_spam_data(tmp_path)


def test_local_zip_source_and_environment_variable(tmp_path, spam_file, monkeypatch):
    zip_path = tmp_path / "sms+spam+collection.zip"
    zip_path.write_bytes(uci_zip(spam_file))
    monkeypatch.setenv("GPTLORA_SPAM_SOURCE", str(zip_path))
    paths = prepare_spam_data(tmp_path / "data")
    assert len(pd.read_parquet(paths["train"])) == 1045


def test_archive_members_outside_the_target_are_refused(tmp_path, spam_file):
    for evil in ("../SMSSpamCollection", "/tmp/SMSSpamCollection"):
        zip_path = tmp_path / "evil.zip"
        zip_path.write_bytes(uci_zip(spam_file, member=evil))
        with pytest.raises(ValueError, match="outside"):
            spam.extract_member(zip_path, "SMSSpamCollection", tmp_path / "data" / "SMSSpamCollection")
        assert not (tmp_path / "SMSSpamCollection").exists() and not (tmp_path / "data").exists()


# ---------------------------------------------------------------- the manifest of the prepared splits

def small_source(path, ham=10, spam=10):
    """A spam file of ``ham`` + ``spam`` short messages."""
    path.write_text("".join(f"ham\tmessage {i}\n" for i in range(ham))
                    + "".join(f"spam\tWIN {i}\n" for i in range(spam)))
    return path


def test_a_different_source_rebuilds_the_splits_and_the_manifest_records_it(tmp_path, spam_file, monkeypatch):
    import json
    import warnings

    from gptlora.infra.manifest import file_fingerprint

    data = tmp_path / "data"
    monkeypatch.delenv("GPTLORA_SPAM_SOURCE", raising=False)
    prepare_spam_data(data, source=spam_file)
    manifest = json.loads((data / spam.MANIFEST_NAME).read_text())
    assert manifest["source"] == str(spam_file.resolve()) and manifest["seed"] == 123
    assert (manifest["source_size"], manifest["source_sha256"]) == (spam.SPAM_FILE_SIZE, spam.SPAM_FILE_SHA256)
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == {
        name: file_fingerprint(path)["sha256"] for name, path in spam.split_paths(data).items()}

    other = small_source(tmp_path / "other.tsv")
    with pytest.warns(UserWarning, match=rf"were made from {spam_file.resolve()}, not from {other}; rebuilding"):
        paths = prepare_spam_data(data, source=other)
    assert sum(len(pd.read_parquet(path)) for path in paths.values()) == 20  # the file named was read
    assert json.loads((data / spam.MANIFEST_NAME).read_text())["source_sha256"] == file_fingerprint(other)["sha256"]

    monkeypatch.setattr(raw_file, "download_file", lambda *a, **k: pytest.fail("must not download"))
    written = {name: path.stat().st_mtime_ns for name, path in paths.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the same source again, or none: reused as they are
        prepare_spam_data(data, source=other)
        assert sum(len(pd.read_parquet(path)) for path in prepare_spam_data(data).values()) == 20
    assert [str(w.message) for w in caught if "rebuilding" in str(w.message)] == []
    assert {name: path.stat().st_mtime_ns for name, path in paths.items()} == written  # not rewritten
    paths = prepare_spam_data(data, source=spam_file)
    assert sum(len(pd.read_parquet(path)) for path in paths.values()) == 1494


@pytest.mark.parametrize("damage", ["no manifest", "manifest not JSON", "manifest of another seed", "split changed",
                                    "split missing", "no source_sha256", "source_size a string", "files a list",
                                    "a split's sha256 a number", "manifest a list"])
def test_a_folder_whose_manifest_does_not_check_out_is_rebuilt(tmp_path, damage, monkeypatch):
    import json

    monkeypatch.delenv("GPTLORA_SPAM_SOURCE", raising=False)
    source, data = small_source(tmp_path / "mine.tsv", ham=30, spam=20), tmp_path / "data"
    with pytest.warns(UserWarning, match="split will differ"):
        good = {name: pd.read_parquet(path) for name, path in prepare_spam_data(data, source).items()}
    manifest_path = data / spam.MANIFEST_NAME
    if damage == "no manifest":
        manifest_path.unlink()
    elif damage == "manifest not JSON":
        manifest_path.write_text('{"files": ')
    elif damage == "manifest of another seed":
        manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "seed": 7}))
    elif damage in ("no source_sha256", "source_size a string", "files a list", "a split's sha256 a number",
                    "manifest a list"):
        manifest = json.loads(manifest_path.read_text())
        if damage == "no source_sha256":
            del manifest["source_sha256"]
        elif damage == "source_size a string":
            manifest["source_size"] = str(manifest["source_size"])
        elif damage == "files a list":
            manifest["files"] = list(manifest["files"])
        elif damage == "a split's sha256 a number":
            manifest["files"]["train"]["sha256"] = 7
        else:
            manifest = [manifest]
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "split changed":
        good["train"][:3].to_parquet(data / "train.parquet", index=False)
    else:
        (data / "test.parquet").unlink()
    with pytest.warns(UserWarning, match=f"not reusing the splits in {data}"):
        paths = prepare_spam_data(data, source)
    for name, path in paths.items():
        assert pd.read_parquet(path).equals(good[name]), name
    assert spam.read_manifest(manifest_path, paths, spam.SPLIT_SEED)[0] is not None


def test_the_smallest_file_the_split_takes_and_one_message_fewer(tmp_path):
    frames = spam.balance_and_split(read_sms_spam(small_source(tmp_path / "ok.tsv", ham=5, spam=5)))
    assert [len(frame) for frame in frames] == [7, 1, 2]
    with pytest.raises(ValueError, match=r"found 5 ham and 4 spam messages: too few .* \(here 5 / 0 / 3 messages\)"):
        spam.balance_and_split(read_sms_spam(small_source(tmp_path / "small.tsv", ham=5, spam=4)))


def test_training_on_the_smallest_split_reports_no_nan(tmp_path, run_cli):
    import json

    from gptlora.formats.hf_layout import config_to_hf
    from gptlora.model import GPTConfig

    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config_to_hf(GPTConfig(
        vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=True))))
    status, out = run_cli(["finetune", "--model", str(model), "--random-init", "--method", "full", "--epochs", "1",
                           "--batch-size", "1", "--eval-iter", "1", "--spam-source",
                           str(small_source(tmp_path / "ok.tsv", ham=5, spam=5)), "--data-dir", str(tmp_path / "d"),
                           "--device", "cpu", "--out", str(tmp_path / "run")])
    assert status == 0 and "nan" not in out
    assert [line.split(":")[0] for line in out.splitlines() if line.endswith("%")] == [
        "train accuracy", "validation accuracy", "test accuracy"]


@pytest.mark.parametrize("kind", ["plain file", "UCI zip"])
def test_reusing_prepared_splits_takes_no_lock_so_a_read_only_folder_works(tmp_path, spam_file, monkeypatch, kind):
    import json

    from gptlora.infra.manifest import file_fingerprint

    data, source = tmp_path / "data", spam_file
    if kind == "UCI zip":
        source = tmp_path / "sms+spam+collection.zip"
        source.write_bytes(uci_zip(spam_file))
    prepare_spam_data(data, source=source)
    manifest = json.loads((data / spam.MANIFEST_NAME).read_text())  # the file named, a zip as the zip
    assert (manifest["source"], manifest["source_size"], manifest["source_sha256"]) == (
        str(source.resolve()), *file_fingerprint(source).values())
    monkeypatch.setattr(spam, "exclusive_lock", lambda *a, **k: pytest.fail("no lock needed to reuse the splits"))
    monkeypatch.setattr(raw_file, "extract_member", lambda *a, **k: pytest.fail("nothing to extract to reuse"))
    assert prepare_spam_data(data) == prepare_spam_data(data, source=source) == spam.split_paths(data)

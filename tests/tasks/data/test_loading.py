from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from shapline.tasks.common.config import DataConfig
from shapline.tasks.common.errors import DataError
from shapline.tasks.data import sources
from shapline.tasks.data.loading import feature_columns, load_data, select_explain_rows, split_features
from shapline.tasks.data.sources import file_sha256, parse_table


@pytest.fixture
def mixed(tmp_path: Path) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "state": ["KS", "OH", None, "NJ"],
            "mins": [1.5, None, 3.0, 4.0],
            "calls": [1, 2, 3, 4],
            "churn": ["no", "yes", "no", "yes"],
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_load_keeps_mixed_types_and_numbers_rows_by_position(
    tmp_path: Path, mixed: pd.DataFrame, suffix: str
) -> None:
    path = tmp_path / f"d{suffix}"
    mixed.to_csv(path, index=False) if suffix == ".csv" else mixed.to_parquet(path)
    loaded = load_data(DataConfig(source=str(path)))
    assert loaded.frame.index.name == "row_id" and list(loaded.frame.index) == [0, 1, 2, 3]
    assert loaded.frame["state"].isna().tolist() == [False, False, True, False]
    assert not pd.api.types.is_numeric_dtype(loaded.frame["state"])
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_hashing_by_chunks_gives_the_sha256_of_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "HASH_CHUNK_BYTES", 7)
    path = tmp_path / "d.bin"
    path.write_bytes(bytes(range(256)) * 41)  # not a whole number of chunks
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_parsing_the_file_equals_parsing_its_bytes(tmp_path: Path, mixed: pd.DataFrame, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    mixed.to_csv(path, index=False) if suffix == ".csv" else mixed.to_parquet(path)
    from_bytes = parse_table(path.read_bytes(), suffix, str(path))
    pd.testing.assert_frame_equal(load_data(DataConfig(source=str(path))).frame, from_bytes, check_exact=True)


def test_a_file_changed_while_read_is_refused(
    tmp_path: Path, mixed: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.csv"
    mixed.to_csv(path, index=False)
    parse = sources.parse_table

    def parse_then_append(
        content: bytes | Path, suffix: str, uri: str, text: tuple[str, ...]
    ) -> pd.DataFrame:
        frame = parse(content, suffix, uri, text)
        with path.open("a") as handle:
            handle.write("KS,1.0,5,no\n")
        return frame

    monkeypatch.setattr(sources, "parse_table", parse_then_append)
    with pytest.raises(DataError, match="changed while it was read"):
        load_data(DataConfig(source=str(path)))


def test_missing_file_names_the_key_and_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.source: file not found: .*nope\.csv"):
        load_data(DataConfig(source=str(tmp_path / "nope.csv")))


def test_unknown_suffix_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("a\n1\n")
    with pytest.raises(DataError, match=r"expected a \.csv or \.parquet"):
        load_data(DataConfig(source=str(tmp_path / "d.txt")))


def test_unknown_scheme_is_rejected() -> None:
    with pytest.raises(DataError, match="unsupported scheme 'gs'"):
        load_data(DataConfig(source="gs://bucket/d.csv"))


def test_features_come_from_config_then_model_then_remaining_columns(mixed: pd.DataFrame) -> None:
    config = DataConfig(source="x.csv", target="churn", drop=["calls"])
    assert feature_columns(mixed, config, None) == ["state", "mins"]
    assert feature_columns(mixed, config, ["mins", "state"]) == ["mins", "state"]
    explicit = DataConfig(source="x.csv", features=["state", "mins"])
    assert feature_columns(mixed, explicit, None) == ["state", "mins"]
    assert feature_columns(mixed, explicit, ["mins", "state"]) == [
        "state",
        "mins",
    ]  # the order: the model's call


def test_configured_features_the_model_would_refuse_are_named(mixed: pd.DataFrame) -> None:
    """Before: the model's refusal blamed a row ("text in state") for a column the config left out."""
    left_out = DataConfig(source="x.csv", features=["mins"])
    with pytest.raises(DataError) as caught:
        feature_columns(mixed, left_out, ["state", "mins", "calls"])
    assert str(caught.value) == (
        "data.features leaves out state, calls, which the model needs; the model's features, in order: "
        "state, mins, calls (or leave data.features out)"
    )
    unknown = DataConfig(source="x.csv", features=["mins", "churn"])
    with pytest.raises(
        DataError, match=r"leaves out state, which the model needs and lists churn, which the"
    ):
        feature_columns(mixed, unknown, ["state", "mins"])
    # A column the data lacks is validation's to name (column 'nope' is missing).
    assert feature_columns(mixed, DataConfig(source="x.csv", features=["nope"]), ["mins"]) == ["nope"]


def test_explain_rows_are_a_seeded_sample_in_row_order(mixed: pd.DataFrame) -> None:
    first = select_explain_rows(mixed, 2, seed=3)
    assert list(first.index) == sorted(first.index) and len(first) == 2
    assert list(first.index) == list(select_explain_rows(mixed, 2, seed=3).index)
    assert select_explain_rows(mixed, "all", 0) is mixed
    assert select_explain_rows(mixed, 10, 0) is mixed


def test_split_features_checks_target_and_reserved_names(mixed: pd.DataFrame) -> None:
    frame, target = split_features(mixed, DataConfig(source="x.csv", target="churn"), ["state", "mins"])
    assert list(frame.columns) == ["state", "mins"] and target is not None
    with pytest.raises(DataError, match=r"data\.target: column 'Churn\?' is not in"):
        split_features(mixed, DataConfig(source="x.csv", target="Churn?"), ["state"])
    for reserved in ("row_id", "shapline_weight"):
        with pytest.raises(DataError, match=rf"data\.features: '{reserved}': a name shapline gives a column"):
            split_features(mixed.rename(columns={"mins": reserved}), DataConfig(source="x.csv"), [reserved])


def test_an_id_column_is_kept_exactly_as_the_csv_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    path.write_text("customer,x\n000002,1.5\n2,2.5\n0x1F,3.0\n")
    data = load_data(DataConfig(source=str(path), id_column="customer"))
    assert data.frame["customer"].tolist() == ["000002", "2", "0x1F"]
    assert pd.api.types.is_float_dtype(data.frame["x"])  # the other columns keep pandas' reading

"""cnnlens.files.write_csv against its oracle, pandas' DataFrame.to_csv(index=False): the same bytes for
every kind of value the stages write, and for random tables of them."""

from __future__ import annotations

import random
import struct

import numpy as np
import pandas as pd
import pytest

from cnnlens.files import write_csv


def assert_same_bytes(tmp_path, rows: list[dict], columns: list[str] | None = None) -> bytes:
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "pandas.csv", index=False)
    write_csv(tmp_path / "ours.csv", rows, columns=columns)
    theirs, ours = (tmp_path / "pandas.csv").read_bytes(), (tmp_path / "ours.csv").read_bytes()
    assert ours == theirs, (rows, columns)
    return ours


COLUMNS = {
    "python floats": [0.1, 1e-05, 0.30000000000000004, 1e16, 123456789.123, -0.0, float("inf"), 2.5e-300],
    "float64": list(np.array([0.1, 1e-05, 0.5, 1e16, 1.0])),
    "float32": list(np.array([0.1, 1e-05, 0.3, 1.0, np.nan], dtype=np.float32)),
    "float32 and float64": [np.float32(0.1), np.float64(0.25)],
    "ints and floats": [1, 0.5, 2, 3.0],
    "ints and a missing one": [1, None, np.int64(2), 3],
    "floats and missing ones": [1.5, None, float("nan"), 2.0],
    "ints": [0, -5, 2**62, np.int64(7)],
    "bools": [True, np.bool_(False), np.True_],
    "bools and a missing one": [True, None, False],
    "text": ["a", "", "b,c", 'q"x', "x\ny", "a\r", " s ", "é", "nan", "1.0"],
    "text and missing ones": ["a", None, "", float("nan")],
    "nothing": [None, None],
    "mixed": ["a", 1, 2.5, True, np.float32(0.1)],
}


@pytest.mark.parametrize("name", COLUMNS)
def test_each_kind_of_value_is_written_as_pandas_writes_it(tmp_path, name):
    values = COLUMNS[name]
    assert_same_bytes(tmp_path, [{"c": v} for v in values])  # one column: an empty cell is ""
    assert_same_bytes(tmp_path, [{"c": v, "d": i} for i, v in enumerate(values)])


def test_the_columns_are_the_keys_in_order_of_first_appearance_or_those_given(tmp_path):
    rows = [{"b": 1, "a": "x"}, {"a": "y", "c": 0.5}, {}]
    assert assert_same_bytes(tmp_path, rows) == b"b,a,c\n1.0,x,\n,y,0.5\n,,\n"
    assert assert_same_bytes(tmp_path, rows, ["c", "a"]) == b"c,a\n,x\n0.5,y\n,\n"
    header = ["path", "split", "class", "reason"]  # prepare's skipped.csv with nothing skipped
    assert assert_same_bytes(tmp_path, [], header) == b"path,split,class,reason\n"
    assert assert_same_bytes(tmp_path, []) == b"\n"
    assert_same_bytes(tmp_path, [{}, {}])  # rows and no columns: an empty line each
    assert assert_same_bytes(tmp_path, [{"a,b": 1, "": 2}]) == b'"a,b",\n1,2\n'


def random_value(rng: random.Random, kind: str):
    if kind in ("float", "float64", "float32"):
        bits = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        value = rng.choice(
            [bits, rng.random() * 10 ** rng.randint(-20, 20), round(rng.random(), 6), 1e16, 1e-4]
        )
        with np.errstate(over="ignore"):
            return {"float": value, "float64": np.float64(value), "float32": np.float32(value)}[kind]
    return {
        "int": lambda: rng.choice([0, -5, 2**40, rng.randint(-(10**6), 10**6)]),
        "int64": lambda: np.int64(rng.randint(-(10**9), 10**9)),
        "bool": lambda: rng.random() < 0.5,
        "missing": lambda: rng.choice([None, float("nan")]),
        "text": lambda: rng.choice(["", "a", "b,c", 'q"x', "x\ny", " s ", "None"]),
    }[kind]()


KINDS = ("float", "float64", "float32", "int", "int64", "bool", "missing", "text")


def test_random_tables_give_pandas_bytes(tmp_path):
    rng = random.Random(0)
    for _ in range(300):
        kinds = [rng.sample(KINDS, rng.randint(1, 3)) for _ in range(rng.randint(1, 4))]
        rows = [
            {f"c{i}": random_value(rng, rng.choice(k)) for i, k in enumerate(kinds) if rng.random() > 0.05}
            for _ in range(rng.randint(0, 8))
        ]
        assert_same_bytes(
            tmp_path, rows, [f"c{i}" for i in range(len(kinds))] if rng.random() < 0.5 else None
        )

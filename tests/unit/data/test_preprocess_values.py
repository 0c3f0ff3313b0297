"""Every number of a preprocess.json (``train --preprocess FILE``, the one beside ``--data``, a weights file's
recipe) is checked finite and in range, a bad one a one-line error naming the file and the key."""

from __future__ import annotations

import json

import pytest

from verydeep.data import IMAGENET, Preprocess
from verydeep.data.preprocess import load_preprocess, read_preprocess
from verydeep.errors import UserError
from verydeep.io.weights import CAFFE
from verydeep.train.recipe import parse_preprocess, read_recipe, read_run_record

NAN, INF = float("nan"), float("inf")
GOOD = IMAGENET.to_dict()


@pytest.mark.parametrize(("change", "said"), [
    ({"mean": [NAN, 0.5, 0.5]}, r"mean\[0\] is nan; expected a finite number from 0 to 1"),
    ({"mean": [0.5, 1e6, 0.5]}, r"mean\[1\] is 1000000.0; expected a finite number from 0 to 1"),
    ({"mean": [0.5, 0.5, -0.1]}, r"mean\[2\] is -0.1"),
    ({"mean": ["a", 0.5, 0.5]}, r"mean\[0\] must be a number; got 'a'"),
    ({"mean": [True, 0.5, 0.5]}, r"mean\[0\] must be a number; got True"),
    ({"mean": 0.5}, "mean must be a list of 3 numbers"),
    ({"std": [INF, 0.2, 0.2]}, r"std\[0\] is inf; expected a finite number from 0.001"),
    ({"std": [0.2, 1e-300, 0.2]}, r"std\[1\] is 1e-300; expected a finite number from 0.001 \(a quarter of one"),
    ({"std": [0.2, 0.2, 58.4]}, r"std\[2\] is 58.4; .* to 1 \(statistics are on the 0..1 scale\)"),
    ({"std": [0.2, 0, 0.2]}, r"std\[1\] is 0.0"),
    ({"eigval": [NAN, 0.1, 0.1]}, r"eigval\[0\] is nan"),
    ({"eigval": [-1, 0.1, 0.1]}, r"eigval\[0\] is -1.0; expected a finite number from 0"),
    ({"eigval": [1e308, 0.1, 0.1]}, r"eigval\[0\] is 1e\+308; .* to 1 \(statistics are on the 0..1 scale\)"),
    ({"mean": [10**400, 0.5, 0.5]}, r"mean\[0\] is 10000000000000000000...: far beyond"),
    ({"eigvec": [[NAN, 0, 0], [0, 1, 0], [0, 0, 1]]}, r"eigvec\[0\]\[0\] is nan"),
    ({"eigvec": [[1, 0], [0, 1]]}, "eigvec must be 3x3"),
    ({"eigvec": 1}, "eigvec must be 3 rows of 3 numbers"),
    ({"eigvec": [[2, 0, 0], [0, 1, 0], [0, 0, 1]]}, "eigvec's columns must be orthonormal"),
    ({"value_scale": INF}, "value_scale is inf; expected a number from 1"),
    ({"value_scale": 1e-300}, r"value_scale is 1e-300; expected a number from 1 \(inputs on 0..1\) to 65535"),
    ({"value_scale": 1e308}, "value_scale is 1e\\+308"),
    ({"value_scale": 10**400}, "value_scale is 10000000000000000000...: far beyond"),
    ({"valuescale": 255}, r"unknown key 'valuescale' \(the keys are mean, std, eigval, .*; a note of one's own goes "
                          "under notes"),
    ({"channel_order": "BGR"}, "unknown key 'channel_order'"),
])
def test_a_bad_number_in_a_preprocess_file_names_the_file_and_key(tmp_path, change, said):
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps({**GOOD, **change}))
    (tmp_path / "train").mkdir()
    for read in (read_preprocess, parse_preprocess, load_preprocess, lambda _: load_preprocess(tmp_path / "train")):
        with pytest.raises(UserError, match=said) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(f"{path}: bad preprocess statistics") and "\n" not in message


def test_a_file_that_is_no_json_object_is_one_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(UserError, match="list.json: bad preprocess statistics .*must be a JSON object; got list"):
        read_preprocess(path)
    path.write_text("[" * 100_000 + "]" * 100_000)  # deeper than the JSON reader recurses
    with pytest.raises(UserError, match="list.json: bad preprocess statistics .RecursionError"):
        read_preprocess(path)


def test_a_file_given_for_its_statistics_is_read_whatever_its_name(tmp_path):
    """A statistics file named otherwise than *.json is read as one, never passed over for ImageNet's."""
    (tmp_path / "stats.JSON").write_text(json.dumps(CAFFE.to_dict()))
    (tmp_path / "stats.txt").write_text("not statistics")
    assert load_preprocess(tmp_path / "stats.JSON") == CAFFE
    with pytest.raises(UserError, match="stats.txt: bad preprocess statistics"):
        load_preprocess(tmp_path / "stats.txt")


def test_the_known_conventions_and_rounded_eigenvectors_pass():
    for pre in (IMAGENET, CAFFE):
        assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    rounded = [[round(v, 3) for v in row] for row in GOOD["eigvec"]]
    assert Preprocess.from_dict({**GOOD, "eigvec": rounded}).eigvec == tuple(map(tuple, rounded))
    assert Preprocess.from_dict({**GOOD, "mean": [0, 1, 0.5], "eigval": [0, 0, 0]}).mean == (0.0, 1.0, 0.5)
    assert Preprocess.from_dict({**GOOD, "notes": {"crawl": "ours"}}) == IMAGENET  # the user's own notes


def test_a_preprocess_file_and_a_recipe_written_with_a_byte_order_mark_read(tmp_path):
    (tmp_path / "preprocess.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())  # as Notepad saves
    assert read_preprocess(tmp_path / "preprocess.json") == IMAGENET
    (tmp_path / "r.toml").write_bytes(b"\xef\xbb\xbfepochs = 3\nlr = 0.02\n")
    assert read_recipe(tmp_path / "r.toml") == {"epochs": 3, "lr": 0.02}


def test_a_number_of_thousands_of_digits_in_a_recipe_or_a_run_record_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "r.toml").write_text("lr = 1" + "0" * 5000 + "\n")  # beyond what Python converts to an int
    with pytest.raises(UserError, match=f"^{tmp_path / 'r.toml'}: not valid TOML"):
        read_recipe(tmp_path / "r.toml")
    (tmp_path / "recipe.json").write_text('{"lr": 1' + "0" * 5000 + "}")
    with pytest.raises(UserError, match=f"^{tmp_path / 'recipe.json'}: damaged run record"):
        read_run_record(tmp_path)


def test_a_run_record_an_editor_saved_with_a_byte_order_mark_reads(tmp_path):
    (tmp_path / "recipe.json").write_bytes(b'\xef\xbb\xbf{"lr": 0.01}')
    assert read_run_record(tmp_path) == {"lr": 0.01}

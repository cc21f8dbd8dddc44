"""The earth catalogues without a repository layout: two ship inside the package (with their source and
licence), the third is read from ``$STEERFLOW_EARTH_DATA`` or a path, and a missing one says where it comes from."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from steerflow.data import earth
from steerflow.data.earth import EARTH_DATASETS, earth_data_dir, load_earth

ROOT = Path(__file__).resolve().parents[1]
# the full data of the tests and CI: $STEERFLOW_EARTH_DATA, else the repository's ../shared/data/earth
SHARED_EARTH = Path(os.environ.get("STEERFLOW_EARTH_DATA") or ROOT.parent / "shared" / "data" / "earth")
needs_shared = pytest.mark.skipif(not (SHARED_EARTH / "flood.csv").is_file(), reason="shared earth data not present")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("STEERFLOW_EARTH_DATA", raising=False)


def test_volcano_and_earthquake_ship_inside_the_package_with_their_source(no_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to a working directory or a checkout
    package = Path(earth.__file__).resolve().parent
    assert earth_data_dir() == package / "earth_data"
    for name, rows in (("volcano", 827), ("earthquake", 6120)):
        assert earth.earth_file(name).parent == package / "earth_data"
        assert load_earth(name).shape == (rows, 3)
    source = (package / "earth_data" / "SOURCE.md").read_text()
    for words in ("doi:10.7289/V5JW8BSH", "doi:10.7289/V5TD9V7K", "public domain", "flood.csv"):
        assert words in source
    assert not (package / "earth_data" / "flood.csv").exists()  # its source states no licence: not shipped
    text = Path(earth.__file__).read_text()
    assert "../shared" not in text and '"shared"' not in text  # no default path into a repository layout


def test_package_data_ships_the_catalogues_and_their_source():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["steerflow.data"]
    shipped = {p.name for g in globs for p in (ROOT / "steerflow" / "data").glob(g)}
    assert shipped == {"volerup.csv", "quakes_all.csv", "SOURCE.md"}


@needs_shared
def test_the_shipped_catalogues_are_the_shared_files_byte_for_byte():
    for name in ("volcano", "earthquake"):
        file = EARTH_DATASETS[name]
        assert earth.PACKAGED_EARTH_DIR.joinpath(file).read_bytes() == (SHARED_EARTH / file).read_bytes()


@needs_shared
def test_flood_comes_from_the_environment_variable_or_a_path(monkeypatch):
    monkeypatch.setenv("STEERFLOW_EARTH_DATA", str(SHARED_EARTH))
    assert load_earth("flood").shape == (4875, 3)
    monkeypatch.delenv("STEERFLOW_EARTH_DATA")
    assert load_earth("flood", root=SHARED_EARTH).shape == (4875, 3)


def test_a_missing_catalogue_says_in_one_line_where_it_comes_from(no_env, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        load_earth("flood")
    msg = str(e.value)
    assert "\n" not in msg and "STEERFLOW_EARTH_DATA" in msg and "Dartmouth Flood Observatory" in msg
    assert "root=" not in msg and "not shipped" in msg
    monkeypatch.setenv("STEERFLOW_EARTH_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no flood\.csv in .*STEERFLOW_EARTH_DATA.*Dartmouth"):
        load_earth("flood")
    with pytest.raises(FileNotFoundError, match=r"no volerup\.csv in .*NOAA NCEI"):
        load_earth("volcano", root=tmp_path)


def test_cli_hint_for_a_missing_catalogue_names_the_environment_variable(no_env, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--manifold", "sphere2", "--data", "flood", "--out", tmp_path / "r",
                         "--steps", 1, "--quiet")
    assert_one_line_error(rc, err, "--data 'flood'", "STEERFLOW_EARTH_DATA", "Dartmouth Flood Observatory")
    assert "root=" not in err

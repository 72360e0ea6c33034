"""The rank-1 protocols on hand-built cases with known answers, rendering, and the GEI baseline."""
import csv
import io
import json

import numpy as np
import pytest
import torch

from fastgait.evaluation import evaluate, gei_baseline, summary, to_csv, to_json, to_markdown, write_report

VIEWS = ["000", "090", "180"]
SUBJECTS = 3


def embedding(targets):
    """A probe whose nearest gallery subject in gallery view ``j`` is ``targets[j]``.

    One block of ``SUBJECTS`` dims per view; a gallery sequence is a one-hot in its view's block,
    a probe holds a one-hot per block, so within one gallery view the distance is smallest
    exactly for the target subject. Two identical parts: the per-part average changes nothing.
    """
    e = np.zeros((len(VIEWS), SUBJECTS))
    e[np.arange(len(VIEWS)), targets] = 1.0
    return np.repeat(e.reshape(-1, 1), 2, axis=1)


def casia_case():
    """Gallery nm-01/nm-02; probes nm-05 (NM), bg-01 (BG), cl-01 (CL); every probe right unless listed."""
    wrong = {  # (condition type, subject, probe view) -> gallery views where the probe is wrong
        ("nm-05", 0, "000"): ["090"],
        ("nm-05", 1, "090"): ["090"],  # identical view: must not count in per_view
        ("bg-01", 2, "180"): ["000", "090"],
        ("cl-01", 0, "000"): ["090", "180"],
        ("cl-01", 1, "000"): ["180"],
    }
    embeddings, labels, types, views = [], [], [], []
    for s in range(SUBJECTS):
        for v, view in enumerate(VIEWS):
            for type_name in ("nm-01", "nm-02"):
                gallery = np.zeros((len(VIEWS), SUBJECTS))
                gallery[v, s] = 1.0
                embeddings.append(np.repeat(gallery.reshape(-1, 1), 2, axis=1))
                labels.append(s), types.append(type_name), views.append(view)
            for type_name in ("nm-05", "bg-01", "cl-01"):
                targets = [s] * len(VIEWS)
                for gallery_view in wrong.get((type_name, s, view), []):
                    targets[VIEWS.index(gallery_view)] = (s + 1) % SUBJECTS
                embeddings.append(embedding(targets))
                labels.append(s), types.append(type_name), views.append(view)
    return np.stack(embeddings).astype(np.float32), labels, types, views


@pytest.mark.parametrize("metric", ["euc", "cos"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_casia_b_known_rank1(metric, as_tensor):
    embeddings, labels, types, views = casia_case()
    embeddings = torch.from_numpy(embeddings) if as_tensor else embeddings
    result = evaluate(embeddings, labels, types, views, protocol="casia-b", metric=metric)
    assert list(result) == ["NM", "BG", "CL"]
    third = 100 * 2 / 3
    nm = result["NM"]
    assert nm["views"] == VIEWS
    np.testing.assert_allclose(nm["matrix"], [[100, third, 100], [100, third, 100], [100, 100, 100]])
    np.testing.assert_allclose(nm["per_view"], [(third + 100) / 2, 100, 100])  # identical view excluded
    assert nm["mean"] == pytest.approx(((third + 100) / 2 + 200) / 3)
    np.testing.assert_allclose(result["BG"]["per_view"], [100, 100, third])
    np.testing.assert_allclose(result["CL"]["matrix"][0], [100, third, 100 / 3])
    np.testing.assert_allclose(result["CL"]["per_view"], [(third + 100 / 3) / 2, 100, 100])
    assert 0 < nm["mAP"] <= 100


def test_views_sort_numerically_and_missing_cells_are_nan():
    embeddings, labels, types, views = casia_case()
    keep = [i for i, (t, v) in enumerate(zip(types, views)) if not (t == "nm-05" and v == "090")]
    result = evaluate(embeddings[keep], *(np.array(x)[keep] for x in (labels, types, views)))
    assert np.isnan(result["NM"]["matrix"][1]).all() and np.isnan(result["NM"]["per_view"][1])
    assert not np.isnan(result["NM"]["mean"])


def test_oumvlp_with_and_without_invalid_probes():
    """Subject 2 has no gallery sequence in view 090: its probes there are invalid."""
    embeddings, labels, types, views = [], [], [], []
    for s in range(SUBJECTS):
        for v, view in enumerate(VIEWS):
            if not (s == 2 and view == "090"):
                gallery = np.zeros((len(VIEWS), SUBJECTS))
                gallery[v, s] = 1.0
                embeddings.append(np.repeat(gallery.reshape(-1, 1), 2, axis=1))
                labels.append(s), types.append("01"), views.append(view)
            targets = [s] * len(VIEWS)
            if (s, view) == (0, "180"):
                targets[0] = 1  # wrong against gallery view 000
            embeddings.append(embedding(targets))
            labels.append(s), types.append("00"), views.append(view)
    with pytest.warns(UserWarning, match=r"2 of 18 \(probe, gallery view\) pairs .* NM-valid rows leave them out"):
        result = evaluate(np.stack(embeddings), labels, types, views, protocol="oumvlp")
    assert result["NM"]["probes_without_gallery"] == 2 and result["NM-valid"]["probes_without_gallery"] == 2
    third = 100 * 2 / 3
    assert list(result) == ["NM", "NM-valid"]
    np.testing.assert_allclose(result["NM"]["matrix"], [[100, third, 100], [100, third, 100], [third, third, 100]])
    np.testing.assert_allclose(result["NM-valid"]["matrix"], [[100, 100, 100], [100, 100, 100], [third, 100, 100]])
    np.testing.assert_allclose(result["NM"]["per_view"], [(third + 100) / 2, 100, third])
    np.testing.assert_allclose(result["NM-valid"]["per_view"], [100, 100, (third + 100) / 2])
    with pytest.warns(UserWarning):
        assert evaluate(np.stack(embeddings), labels, types, views, protocol="auto").keys() == result.keys()
    # cross-view gallery (OpenGait's): one gallery of all views, the probe subject's own view left out
    cross = evaluate(np.stack(embeddings), labels, types, views, protocol="oumvlp", cross_view_gallery=True)
    assert list(cross) == ["NM"] and cross["NM"]["matrix"] is None and cross["NM"]["probes_without_gallery"] == 0


def test_bad_inputs():
    embeddings, labels, types, views = casia_case()
    with pytest.raises(ValueError, match="protocol"):
        evaluate(embeddings, labels, types, views, protocol="casia")
    with pytest.raises(ValueError, match="labels"):
        evaluate(embeddings, labels[:-1], types, views)
    with pytest.raises(ValueError, match=r"\[n, c, p\]"):
        evaluate(embeddings[:, :, 0], labels, types, views)
    with pytest.raises(ValueError, match="no probe"):
        evaluate(embeddings[:2], labels[:2], ["nm-01", "nm-02"], views[:2])


def test_rendering(tmp_path):
    result = evaluate(*casia_case())
    markdown = to_markdown(result)
    lines = markdown.splitlines()
    assert lines[0] == "| condition | 000 | 090 | 180 | mean |"
    assert lines[2].startswith("| NM | 83.3 | 100.0 | 100.0 | 94.4 |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| NM", "| BG", "| CL"]
    rows = list(csv.reader(io.StringIO(to_csv(result))))
    assert rows[0] == ["condition", "000", "090", "180", "mean"] and rows[1][0] == "NM"
    assert float(rows[1][-1]) == pytest.approx(94.44, abs=0.01)
    assert summary(result) == "NM 94.4 | BG 88.9 | CL 83.3"
    paths = write_report(result, tmp_path / "report", title="hand-built")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    loaded = json.loads(paths["json"].read_text())
    assert loaded["NM"]["views"] == VIEWS and len(loaded["NM"]["matrix"]) == 3
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| NM probe \\ gallery | 000 | 090 | 180 |" in paths["md"].read_text()


def test_json_has_no_nan():
    result = {"NM": {"matrix": np.array([[np.nan, 1.0]]), "per_view": np.array([1.0]), "mean": float("nan")}}
    assert json.loads(json.dumps(to_json(result))) == {"NM": {"matrix": [[None, 1.0]], "per_view": [1.0], "mean": None}}


def test_gei_baseline_on_a_tiny_synthetic_set(tmp_path):
    from fastgait.data.synthetic import generate

    root = generate(
        tmp_path / "syn", "small", seed=0, workers=2, progress=False, subjects=4, train_subjects=1,
        views=("000", "090"), train_types=("nm-01",), min_cycles=1.0, extra_frames=0,
        test_types=("nm-01", "nm-02", "nm-05", "bg-01", "cl-01"),
    )
    result = gei_baseline(root)
    assert list(result) == ["NM", "BG", "CL"]
    assert np.nanmean(np.diagonal(result["NM"]["matrix"])) >= 50  # same view: GEIs match

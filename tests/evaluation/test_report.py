"""report.html: the sections and their numbers, self-containment, escaping of hostile texts, thumbnails only from the
data root, the page in headless Chromium (no console error, no request, the table sorts), and the publish hook with
`crossmodal report`."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from crossmodal.artifacts import (
    PLOTS_DIR,
    PREDICTIONS_FILE,
    QUARANTINE_FILE,
    REPORT_FILE,
    VALIDATED_FILE,
    VALIDATION_FILE,
)
from crossmodal.cli import app
from crossmodal.errors import ReportError
from crossmodal.evaluation.report import GALLERY_CORRECT, GALLERY_MISTAKES, THUMB_PX, build_report, thumbnail_data_uri
from crossmodal.registry.promotion import GateDecision
from crossmodal.registry.publish import REPORT_INPUTS_TAG, attach_report, build_summary, publish

HOSTILE_CAPTION = "<script>alert(1)</script>"
HOSTILE_REASON = "<img src=x onerror=alert(2)>"
HOSTILE_LABEL = '<b id="bold">neutral</b>'
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
URL_ATTRS = {"src", "href", "xlink:href", "action", "formaction", "data", "poster", "srcset", "background"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None = None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []  # elements and texts, in document order

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs):
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())]

    def find(self, tag: str | None = None, **attrs):
        found = self.find_all(tag, **attrs)
        return found[0] if found else None

    def all_text(self) -> str:
        return "".join(c if isinstance(c, str) else c.all_text() for c in self.children)


class TreeBuilder(HTMLParser):
    """The page as a tree of Nodes (enough of a DOM for these checks)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.node = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, dict(attrs), self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def cell_value(td: Node) -> float | None:
    value = td.attrs.get("data-value")
    return None if value in (None, "") else float(value)


@pytest.fixture(scope="module")
def gate_decision() -> dict:
    return GateDecision(promoted=True, reason="challenger better on 16 unseen rows", metric="macro_f1",
                        challenger_version="2", challenger_score=0.61, champion_version="1", champion_score=0.55,
                        delta=0.06, test="paired_bootstrap", n_rows=16, ci_low=0.01, ci_high=0.12, p_value=0.03,
                        confidence=0.95).to_dict()


@pytest.fixture(scope="module")
def report(tiny_run, gate_decision, tmp_path_factory) -> dict:
    """The tiny run's report, with a summary holding a gate decision and its interval."""
    validated = tiny_run["validated_dir"]
    validation = json.loads((validated / VALIDATION_FILE).read_text())
    summary = build_summary(tiny_run["metrics"], validation, str(validated / QUARANTINE_FILE),
                            {"run_id": "abc123", "model_name": "crossmodal-demo", "version": "2",
                             "champion_version": "2"}, gate_decision)
    out = tmp_path_factory.mktemp("report") / REPORT_FILE
    path = build_report(validated, tiny_run["models"], tiny_run["reports"], out, summary)
    html = path.read_text(encoding="utf-8")
    return {"path": path, "html": html, "doc": parse(html), "validation": validation}


def test_the_page_has_every_section_with_the_run_s_numbers(report, tiny_run):
    doc, metrics, validation = report["doc"], tiny_run["metrics"], report["validation"]
    for section in ("data", "comparison", "heads", "attribution", "gate"):
        assert doc.find("section", id=section) is not None, section

    # Data: class balance per split as validation counted it, every quarantine reason with its count.
    balance = doc.find("table", id="class-balance")
    splits = [th.all_text() for th in balance.find("thead").find_all("th")][1:-1]
    for tr in balance.find("tbody").find_all("tr")[:-1]:
        cells = [td.all_text().strip() for td in tr.find_all("td")]
        for split, n in zip(splits, cells[1:-1]):
            assert int(n) == validation["split_counts"][split].get(cells[0], 0)
    reasons = {tr.find_all("td")[0].all_text(): int(tr.find_all("td")[1].all_text())
               for tr in doc.find("table", id="quarantine-reasons").find("tbody").find_all("tr")}
    assert reasons == validation["quarantine_reasons"]
    tiles = doc.find(id="quarantine-gallery").find_all("div", class_="tile wrong")
    assert len(tiles) == validation["rows_quarantined"]
    by_id = {t.find("b").all_text(): t for t in tiles}
    assert by_id["bad-empty-caption"].find("img") is not None  # its image is fine: the text was refused
    assert by_id["bad-missing-image"].find("img") is None
    assert "image file not found" in by_id["bad-missing-image"].all_text()
    assert "does not decode" in by_id["bad-not-an-image"].all_text()
    assert "No identical image or text" in doc.find(id="leakage").all_text()

    # Comparison: one row per head with its test macro-F1; the registered head marked.
    rows = doc.find("table", id="comparison-table").find("tbody").find_all("tr")
    assert sorted(r.find_all("td")[0].attrs["data-value"] for r in rows) == sorted(metrics["heads"])
    for r in rows:
        tds = r.find_all("td")
        expected = metrics["heads"][tds[0].attrs["data-value"]]["test"]["macro_f1"]
        assert cell_value(tds[4]) == pytest.approx(expected)
    registered = metrics["registered_head"]
    assert [r.find_all("td")[0].attrs["data-value"] for r in rows if r.attrs.get("class") == "registered"] == [
        registered]
    assert "points" in doc.find(id="gains").all_text()
    for r in rows:  # a traditional baseline says which features (and projection) it was built from
        name = r.find_all("td")[0].attrs["data-value"]
        if metrics["heads"][name].get("variant"):
            assert f"[{metrics['heads'][name]['variant']}]" in r.find_all("td")[0].all_text()
    assert any(metrics["heads"][n].get("variant") for n in metrics["heads"])

    # Per head: one collapsible block each, only the registered head open, with its three figures.
    details = doc.find_all("details")
    assert sorted(d.attrs["id"] for d in details) == sorted(f"head-{h}" for h in metrics["heads"])
    assert [d.attrs["id"] for d in details if "open" in d.attrs] == [f"head-{registered}"]
    assert len(doc.find("details", id=f"head-{registered}").find_all("figure")) == 3

    # The gate: the decision, both scores, the interval, the p-value and the rows compared.
    gate = doc.find("section", id="gate")
    assert "PROMOTED" in gate.find(id="gate-verdict").all_text()
    text = gate.all_text()
    for shown in ("0.610", "0.550", "+0.060", "[+0.010, +0.120]", "0.0300", "16", "95 % interval"):
        assert shown in text, shown
    assert gate.find("svg") is not None  # the interval drawn around zero


def test_the_gallery_holds_the_most_confident_mistakes_with_their_attribution(report, tiny_run):
    head = tiny_run["metrics"]["registered_head"]
    with np.load(tiny_run["models"] / head / PREDICTIONS_FILE) as z:
        proba, y, ids = z["test_proba"].astype(np.float64), z["test_y"], z["test_ids"]
        no_image, no_text = z["test_proba_missing_image"], z["test_proba_missing_text"]
    pred = proba.argmax(1)
    conf = proba[np.arange(len(y)), pred]
    wrong = np.flatnonzero(pred != y)
    expected = [str(ids[i]) for i in wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY_MISTAKES]]
    doc = report["doc"]
    mistakes = doc.find(id="mistakes").find_all("div", class_="tile wrong") if len(wrong) else []
    assert [t.find("code").all_text() for t in mistakes] == expected
    correct = doc.find(id="correct").find_all("div", class_="tile right")
    assert len(correct) == min(GALLERY_CORRECT, int((pred == y).sum()))
    if len(wrong):
        first = wrong[np.argsort(-conf[wrong], kind="stable")][0]
        attr_image = conf[first] - no_image[first, pred[first]]
        attr_text = conf[first] - no_text[first, pred[first]]
        shown = mistakes[0].all_text()
        assert f"image {round(attr_image, 2) + 0.0:+.2f}" in shown and f"text {round(attr_text, 2) + 0.0:+.2f}" in shown
    for tile in mistakes + correct:
        img = tile.find("img")
        assert img is not None  # every test row of the demo has a decodable image
        thumb = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1])))
        assert max(thumb.size) <= THUMB_PX


def test_the_page_is_self_contained_and_small(report):
    html, doc = report["html"], report["doc"]
    assert report["path"].stat().st_size < 3 * 1024 * 1024
    assert "http://" not in html and "https://" not in html
    assert not doc.find_all("link") and not doc.find_all("iframe") and not doc.find_all("object")
    for node in doc.iter():
        for name, value in node.attrs.items():
            if name in URL_ATTRS and value is not None:
                assert value.startswith(("data:", "#")), f"<{node.tag} {name}={value[:60]!r}>"
        if node.tag == "script":
            assert "src" not in node.attrs
    for style in doc.find_all("style"):
        for url in style.all_text().split("url(")[1:]:
            assert url.lstrip("'\" ").startswith(("data:", "#"))
    for img in doc.find_all("img"):
        Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1]))).verify()


def test_hostile_texts_render_as_text(tiny_run, tmp_path):
    """Captions, quarantine reasons and labels come from a manifest: none of them may become markup."""
    validated, reports = tmp_path / "validated", tmp_path / "reports"
    shutil.copytree(tiny_run["validated_dir"], validated, ignore=shutil.ignore_patterns("data_docs"))
    shutil.copytree(tiny_run["reports"], reports)
    frame = pd.read_parquet(validated / VALIDATED_FILE)
    frame.loc[frame["split"] == "test", "text"] = HOSTILE_CAPTION
    frame.to_parquet(validated / VALIDATED_FILE)
    quarantine = pd.read_csv(validated / QUARANTINE_FILE, dtype=str, keep_default_na=False)
    quarantine.loc[0, "text"] = HOSTILE_CAPTION
    quarantine.loc[0, "reason"] = HOSTILE_REASON
    quarantine.to_csv(validated / QUARANTINE_FILE, index=False)
    metrics = json.loads((reports / "metrics.json").read_text())
    metrics["labels"][0] = HOSTILE_LABEL
    (reports / "metrics.json").write_text(json.dumps(metrics))
    registered = metrics["registered_head"]
    for png in (reports / PLOTS_DIR).glob(f"{registered}_*.png"):
        png.unlink()  # its figures are drawn afresh as SVG, with the hostile label in them

    html = build_report(validated, tiny_run["models"], reports, tmp_path / REPORT_FILE).read_text()
    doc = parse(html)
    scripts = doc.find_all("script")
    assert len(scripts) == 1 and "alert" not in scripts[0].all_text()  # only the page's own sorting script
    assert not [n for n in doc.iter() if any(a.startswith("on") for a in n.attrs)]
    assert doc.find(id="bold") is None
    text = doc.all_text()
    assert HOSTILE_CAPTION in text and HOSTILE_REASON in text and HOSTILE_LABEL in text
    figures = doc.find("details", id=f"head-{registered}").find_all("svg")
    assert len(figures) == 3
    assert any(HOSTILE_LABEL in svg.all_text() for svg in figures)
    ids = [n.attrs["id"] for n in doc.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids))  # the inline figures' clip paths do not collide
    # Without a summary the gate section says there is no decision to show.
    assert "no gate decision" in doc.find(id="gate-note").all_text()


def test_attribution_is_recomputed_from_the_features_when_predictions_lack_it(report, tiny_run, tmp_path):
    """A head saved before predictions.npz held the rows with a modality removed: run it again on the features."""
    from crossmodal.features.extract import extract_features

    head = tiny_run["metrics"]["registered_head"]
    models = tmp_path / "models"
    shutil.copytree(tiny_run["models"] / head, models / head)
    shutil.copy(tiny_run["models"] / "labels.json", models / "labels.json")
    with np.load(models / head / PREDICTIONS_FILE) as z:
        kept = {k: z[k] for k in z.files if "missing" not in k}
    np.savez(models / head / PREDICTIONS_FILE, **kept)
    cfg = tiny_run["cfg"]
    features = extract_features(tiny_run["validated_dir"] / VALIDATED_FILE, cfg.encoders, cfg.paths.cache,
                                progress=False).to_dict()
    args = (tiny_run["validated_dir"], models, tiny_run["reports"])

    recomputed = parse(build_report(*args, tmp_path / "a.html", features=features).read_text())
    assert recomputed.find(id="attribution-note") is None

    def tiles(doc):
        return [t.all_text() for t in doc.find("section", id="attribution").find_all("div", class_="meta")]

    assert tiles(recomputed) == tiles(report["doc"])  # the same drops as the probabilities saved at training

    without = parse(build_report(*args, tmp_path / "b.html").read_text())
    assert "feature files were not given" in without.find(id="attribution-note").all_text()
    assert "image n/a" in without.find(id="mistakes").all_text()


def test_thumbnails_come_only_from_inside_the_data_root(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (400, 300), (200, 30, 30)).save(root / "images" / "big.png")
    Image.new("RGB", (40, 40), (30, 30, 200)).save(outside / "secret.jpg")
    (root / "images" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "images" / "notes.jpg").write_text("not an image")

    uri, why = thumbnail_data_uri("images/big.png", root)
    assert why is None and uri.startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.format == "JPEG" and thumb.size == (THUMB_PX, 72)
    for refused in (outside / "secret.jpg", "../elsewhere/secret.jpg", "images/link.jpg"):
        uri, why = thumbnail_data_uri(refused, root)
        assert uri is None and "outside the data root" in why
    assert thumbnail_data_uri("images/notes.jpg", root) == (None, "image does not decode (UnidentifiedImageError)")
    assert thumbnail_data_uri("images/gone.jpg", root) == (None, "image file not found")
    assert thumbnail_data_uri(None, root) == (None, "no image")
    assert thumbnail_data_uri("images/big.png", None)[0] is None


def test_missing_run_files_are_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="validation.json not found"):
        build_report(tmp_path / "v", tmp_path / "m", tmp_path / "r", tmp_path / REPORT_FILE)


PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || "error"));
}, true);
document.addEventListener("securitypolicyviolation", function (e) { window.__errors.push("csp " + e.blockedURI); });
var consoleError = console.error;
console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, " ")); };
</script>"""
PROBE_BODY = """<script>
window.addEventListener("load", function () {
  var table = document.getElementById("comparison-table");
  function column(i) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[i].getAttribute("data-value"); });
  }
  var f1 = table.tHead.rows[0].cells[4].querySelector("button");
  f1.click(); var first = column(4);
  f1.click(); var second = column(4);
  table.tHead.rows[0].cells[0].querySelector("button").click(); var names = column(0);
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({errors: window.__errors, first: first, second: second, names: names,
    resources: performance.getEntriesByType("resource").map(function (e) { return e.name; }),
    open: Array.prototype.map.call(document.querySelectorAll("details[open]"), function (d) { return d.id; })});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium or chromium-browser on PATH (apt-get install chromium)")
def test_the_page_works_in_headless_chromium(report, tiny_run, tmp_path):
    html = report["html"]
    assert html.count("<head>") == 1 and html.count("</body>") == 1
    page = tmp_path / "report.html"
    page.write_text(html.replace("<head>", "<head>\n" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1))
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run",
                          "--disable-background-networking", "--disable-extensions", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Uncaught" not in out.stderr and "Refused to" not in out.stderr, out.stderr[-2000:]
    probe = parse(out.stdout).find("pre", id="probe")
    assert probe is not None, out.stdout[-2000:]
    result = json.loads(probe.all_text())
    assert result["errors"] == []
    assert result["resources"] == []  # not one request: every figure and thumbnail is inline
    assert result["open"] == [f"head-{tiny_run['metrics']['registered_head']}"]

    def numbers(values):
        return [float(v) for v in values if v != ""]

    assert numbers(result["first"]) == sorted(numbers(result["first"]), reverse=True)  # first click: best first
    assert numbers(result["second"]) == sorted(numbers(result["second"]))  # second click: the other way
    assert result["names"] == sorted(result["names"])
    assert sorted(result["names"]) == sorted(tiny_run["metrics"]["heads"])


def test_publish_writes_the_report_and_logs_it_to_the_run(tiny_run, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    cfg = tiny_run["cfg"].model_copy(deep=True)
    cfg.mlflow.tracking_uri = mlflow_store
    cfg.mlflow.artifact_root = str(tmp_path / "artifacts")
    reports = tmp_path / "run-reports"
    shutil.copytree(tiny_run["reports"], reports)
    summary_path = tmp_path / "summary.json"
    summary = publish(cfg, tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"], reports, summary_path)

    page = reports / REPORT_FILE
    assert summary["report"] == str(page.resolve()) and page.is_file()
    assert json.loads(summary_path.read_text())["report"] == str(page.resolve())
    gate = parse(page.read_text()).find("section", id="gate")
    assert "PROMOTED" in gate.find(id="gate-verdict").all_text()  # the first version becomes champion
    assert summary["promotion"]["reason"] in gate.find(id="gate-reason").all_text()
    run_id = summary["mlflow"]["run_id"]
    client = MlflowClient()
    assert REPORT_FILE in [a.path for a in client.list_artifacts(run_id)]
    inputs = json.loads(client.get_run(run_id).data.tags[REPORT_INPUTS_TAG])
    assert {k: Path(v) for k, v in inputs.items()} == {
        "validated": tiny_run["validated_dir"].resolve(), "models": tiny_run["models"].resolve(),
        "reports": reports.resolve()}


def test_a_report_that_cannot_be_built_or_logged_never_fails_the_run(tiny_run, tmp_path, mlflow_store,
                                                                      monkeypatch, caplog):
    import crossmodal.evaluation.report

    reports = tmp_path / "reports"
    shutil.copytree(tiny_run["reports"], reports)
    summary = {"mlflow": {}, "promotion": {}}
    with caplog.at_level(logging.WARNING, logger="crossmodal.registry.publish"):
        attach_report(summary, tiny_run["validated_dir"], tiny_run["models"], reports, "0" * 32)
    assert summary["report"] == str((reports / REPORT_FILE).resolve())  # built; only the upload failed
    assert any("not logged to MLflow run" in r.getMessage() for r in caplog.records)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(crossmodal.evaluation.report, "build_report", broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crossmodal.registry.publish"):
        attach_report(summary, tiny_run["validated_dir"], tiny_run["models"], reports, None)
    assert summary["report"] is None
    assert any("report.html not built" in r.getMessage() and "disk full" in r.getMessage() for r in caplog.records)


def test_crossmodal_report_rebuilds_the_latest_or_fetches_a_run_s(tiny_run, tmp_path, mlflow_store, monkeypatch,
                                                                  report):
    from mlflow.tracking import MlflowClient

    reports = tmp_path / "run-reports"
    shutil.copytree(tiny_run["reports"], reports)
    page = reports / REPORT_FILE
    summary_path = tmp_path / "summary.json"
    validated = tiny_run["validated_dir"]
    summary = {"rows": {"validated_file": str((validated / VALIDATED_FILE).resolve())}, "report": str(page),
               "mlflow": {}, "promotion": {}}
    summary_path.write_text(json.dumps(summary))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"mlflow": {"tracking_uri": mlflow_store,
                                             "artifact_root": str(tmp_path / "artifacts")},
                                  "paths": {"summary": str(summary_path), "reports": str(tmp_path / "cli")}}))
    runner = CliRunner()

    # No --run-id: the latest run's page, rebuilt where the summary says it lives.
    result = runner.invoke(app, ["report", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(page.resolve()) and page.is_file()
    assert parse(page.read_text()).find("section", id="comparison") is not None

    # --run-id: the run's artifact, downloaded; --open hands it to the browser.
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("reports", str(tmp_path / "artifacts"))).info.run_id
    client.log_artifact(run_id, str(report["path"]))
    client.set_tag(run_id, REPORT_INPUTS_TAG, json.dumps({"validated": str(validated),
                                                          "models": str(tiny_run["models"]),
                                                          "reports": str(reports)}))
    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    result = runner.invoke(app, ["report", "--run-id", run_id, "--open", "--params", str(params)])
    assert result.exit_code == 0, result.output
    fetched = (tmp_path / "cli" / f"report-{run_id}.html").resolve()
    assert result.output.strip() == str(fetched) and opened == [fetched.as_uri()]
    assert fetched.read_bytes() == report["path"].read_bytes()

    # The artifact gone: rebuilt from the folders the run's tag names (no summary of that run: no gate decision).
    artifact = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / REPORT_FILE
    artifact.unlink()
    fetched.unlink()
    result = runner.invoke(app, ["report", "--run-id", run_id, "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "no gate decision" in parse(fetched.read_text()).find(id="gate-note").all_text()

    # Nothing to fetch or rebuild: one clear line each, no traceback.
    bare = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    for args, message in ((["--run-id", "0" * 32], "no MLflow run"), (["--run-id", bare], "no report.html artifact")):
        result = runner.invoke(app, ["report", *args, "--params", str(params)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    summary_path.unlink()
    result = runner.invoke(app, ["report", "--params", str(params)])
    assert result.exit_code == 2 and "summary.json not found" in result.output

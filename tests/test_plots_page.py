"""Plain `dvc plots show`, as users type it, draws every chart without internet: .dvc/config's
`plots.html_template` is the page `python -m pipeline.plots --template` writes (vega inline), and the
templates of .dvc/plots/ give each method its own colour and the FID charts a log axis. Checked in
headless Chromium that may not resolve any host name, on a copy of the repository with the committed
outputs."""

import html
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT, copy_repo, run_env

# Wraps vegaEmbed before DVC's chart scripts call it, then writes what each view drew into the page.
HOOK = """<script>
const embed = window.vegaEmbed, embeds = [];
window.vegaEmbed = (...args) => { const p = embed(...args); embeds.push(p); return p; };
</script>"""
REPORT = """<script>
function colours(node, found) {  // the colours of the data's lines and points (not the legend's)
  for (const item of node.items || []) {
    if (node.role === "mark" && ["line", "symbol"].includes(node.marktype)) found.add(item.stroke || item.fill);
    colours(item, found);
  }
  return found;
}
Promise.all(embeds).then(results => {
  const pre = document.createElement("pre");
  pre.id = "report";
  pre.textContent = JSON.stringify(results.map(r => ({
    title: r.spec.title.text, x: r.view.scale("x").type, y: r.view.scale("y").type,
    colours: [...colours(r.view.scenegraph().root, new Set())]})));
  document.body.append(pre);
});
</script>"""


def chromium() -> str:
    """Installed as `make screenshots` does where missing (a fresh CI machine); skips only where it cannot be."""
    if shutil.which("chromium") is None:
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, capture_output=True,
                       timeout=600)
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("no Chromium, and `apt-get install chromium` failed here (it needs root and Debian's archive)")
    return found


@pytest.mark.slow
def test_plain_dvc_plots_show_draws_every_chart_offline(tmp_path):
    browser = chromium()
    repo = copy_repo(tmp_path / "repo")
    # the compare stage's tables and the loss curves as committed (a fresh clone's; not a repro under way)
    committed = subprocess.run(["git", "archive", "HEAD", "out"], cwd=ROOT, check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(committed)).extractall(repo, filter="data")
    made = subprocess.run([sys.executable, "-m", "pipeline.plots", "--template"], cwd=repo, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=repo, env=run_env(),
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "<script src" not in page
    charts = page.count("vegaEmbed('#")  # the comparison charts and each method's loss (the images are <img>)
    probe = repo / "dvc_plots" / "probe.html"  # beside index.html: its images' relative paths still hold
    # the hook after the first script (the inline libraries, whose text holds "<body>"), the report last
    head, end, body = page.partition("</script>")
    probe.write_text(head + end + HOOK + body.replace("</body>", REPORT + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",  # no CDN, even online
         "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    start = dom.stdout.find('<pre id="report">')
    assert start >= 0, dom.stdout[-3000:]  # none: a chart failed to embed
    text = html.unescape(dom.stdout[start:].split(">", 1)[1].split("</pre>")[0])
    report = {view["title"]: view for view in json.loads(text)}
    # each chart embedded, drawn (vega-embed's <svg class="marks">), with lines or points in its scene
    drawn = dom.stdout.count('class="marks"')
    assert len(report) == charts == drawn and all(view["colours"] for view in report.values()), (drawn, report)
    assert {"fid_by_network_evaluations", "learning_curves", "precision_recall"} <= report.keys(), report
    methods = {column for name in ("fid_by_nfe.tsv", "fid_by_nfe_finetuned.tsv")
               for column in (repo / "out/compare" / name).read_text().split("\n", 1)[0].split("\t")[1:]}
    for title in ("fid_by_network_evaluations", "learning_curves"):
        assert report[title]["y"] == "log", report[title]
        assert len(report[title]["colours"]) == len(methods) > 1, (methods, report[title])  # one per method
    assert report["fid_by_network_evaluations"]["x"] == "log"  # 1, 2 and 35 evaluations apart
    assert len(report["precision_recall"]["colours"]) > 1, report["precision_recall"]

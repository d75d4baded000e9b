"""The dashboard in real headless Chromium against a real `panel serve` on 127.0.0.1.

One server and one browser for the module. Traces: a synthetic replay trace (written through the
real TraceWriter), a damaged store, and a live trace recorded by a real `workbench generate --record`
while the page watches. Screenshots of every view go to test-artifacts/screenshots/.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.trace.reader import open_trace
from workbench.trace.synthetic import write_synthetic_trace
from workbench.views.server import free_port, wait_until_listening

from process_group import end_group, held

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LIVE_TOKENS = 800   # ~7 s of generation here; the live test's pauses get through ~250 of them
LIVE_PAUSES = 4     # commits, after the run first appears, at which the live test holds it and times the page
PROMPT = "def dashboard(live):\n"

if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (scripts/setup --browser)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_synthetic_trace(root / "replay", n_steps=40, n_layers=4, n_heads=4, world=2, perceiver=True, seed=3,
                          user_probe=True)
    write_synthetic_trace(root / "replay-b", n_steps=30, n_layers=4, n_heads=4, seed=5)  # to compare with
    (root / "broken").mkdir()
    (root / "broken" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": '
                                               '{"format": "workbench-trace", "format_version": 1}}')
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random byte-level Llama checkpoint: real generation, a few seconds long.

    Six layers of width 128 make a decode step slow enough (several ms with recording) that a
    LIVE_TOKENS run spans many of the writer's commits.
    """
    from workbench.models.config import LlamaConfig
    from workbench.models.llama import Llama
    from workbench.runtime.checkpoint import save_llama
    from workbench.runtime.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    cfg = LlamaConfig(vocab_size=259, d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=1024,
                      bos_id=256, eos_id=None)
    save_llama(Llama(cfg), path, ByteTokenizer(bos_id=256, eos_id=None))
    return path


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", CI="1")


@pytest.fixture(scope="module")
def server(traces):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", str(ROOT / "apps" / "dashboard.py"), "--address", "127.0.0.1",
         "--port", str(port), "--allow-websocket-origin", f"127.0.0.1:{port}", "--args", str(traces)],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_listening("127.0.0.1", port, 90, proc)
        yield f"http://127.0.0.1:{port}/dashboard"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A browser tab on the dashboard that records console errors."""

    def __init__(self, browser, url: str, ready: str = "heatmap") -> None:
        self.page = browser.new_page(viewport={"width": 1500, "height": 1150})
        self.page.set_default_timeout(60_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url, timeout=120_000)
        if ready == "heatmap":   # a trace is shown: its attention map has a title
            self.wait_for(lambda: (self.model_text("attention-main") or "").startswith("layer"), "the page to render")
            self.wait_for(lambda: self.tokens()[0] > 0, "the token text")
        else:                    # no trace: the error box is shown instead
            self.wait_for(lambda: self.error_text().strip(), "the error box")

    def error_text(self) -> str:
        return self.deep_text("wb-error")

    def deep_text(self, css_class: str) -> str:
        """Text of the element with ``css_class``, shadow roots included (innerText skips them)."""
        return self.page.evaluate("""(cls) => {
            const deep = (n) => n.shadowRoot ? deep(n.shadowRoot) : Array.from(n.childNodes).map(
                c => c.nodeType === 3 ? c.textContent : (c.nodeType === 1 || c.nodeType === 11) ? deep(c) : '').join('');
            const host = (function find(root) {
                for (const e of root.querySelectorAll('*')) {
                    if (e.classList.contains(cls)) return e;
                    if (e.shadowRoot) { const f = find(e.shadowRoot); if (f) return f; }
                }
                return null; })(document);
            return host && getComputedStyle(host).display !== 'none' ? deep(host) : ''; }""", css_class)

    def wait_for(self, condition, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            self.page.wait_for_timeout(100)
        raise AssertionError(f"timed out waiting for {what}")

    def model_text(self, name: str) -> str | None:
        """Title of the Bokeh figure called ``name`` in the page's document (None if absent)."""
        return self.page.evaluate("""(name) => {
            const docs = (window.Bokeh && Bokeh.documents) || [];
            for (const d of docs) { const m = d.get_model_by_name(name); if (m) return m.title.text; }
            return null; }""", name)

    def image_digest(self, source: str) -> list[float]:
        """Shape and a weighted sum of the first image in a named ColumnDataSource."""
        return self.page.evaluate("""(name) => {
            const d = Bokeh.documents[0]; const s = d.get_model_by_name(name);
            const img = s.data.image[0]; let total = 0, weighted = 0;
            for (let i = 0; i < img.length; i++) { const v = img[i]; if (isFinite(v)) { total += v; weighted += v * (i % 97); } }
            return [img.length, total, weighted]; }""", source)

    def tokens(self) -> tuple[int, int]:
        """(token spans in the page, those not faded as 'after the selected step')."""
        return (self.page.locator(".tok").count(), self.page.locator(".tok.future").count())

    def select(self, css: str, label: str) -> None:
        self.page.locator(f"{css} select").select_option(label=label)

    def tab(self, name: str) -> None:
        self.page.locator(".bk-tab", has_text=name).first.click()
        self.page.wait_for_timeout(700)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def _open(url: str, ready: str = "heatmap") -> Page:
        pages.append(Page(browser, url, ready))
        return pages[-1]

    yield _open
    for p in pages:
        p.close()


# --------------------------------------------------------------------------- tests
def test_page_loads_without_console_errors_and_shows_every_view(server, open_page):
    page = open_page(server + "?trace=replay")
    assert "layer 0 · head 0 · step 39" in page.model_text("attention-main")
    # prompt + one token per step (the last step's sample lies past the trace's positions), none faded
    assert page.tokens() == (16 + 39, 0)
    page.shot("attention")
    first = page.page.locator(".tok.gen").first
    assert " · p = " in first.get_attribute("title") and not first.get_attribute("style")
    page.page.locator(".wb-shade input").check()                 # shade tokens by probability
    page.wait_for(lambda: "rgba(230, 85, 13" in (first.get_attribute("style") or ""), "the tokens to be shaded")
    page.shot("tokens_shaded")
    page.page.locator(".wb-shade input").uncheck()
    page.wait_for(lambda: not first.get_attribute("style"), "the shading to go")
    for tab, figure, shot in (("Heads", "heads-matrix", "heads"), ("Perceiver", "perceiver-cross", "perceiver"),
                              ("KV cache", "kv-mass", "kv_cache"),
                              ("Activations", "activations-by-layer", "activations"),
                              ("Time", "timing-layers", "time"), ("Communication", "comm-timeline", "communication"),
                              ("Your probes", "user-step", "your_probes"), ("Run", None, "run")):
        page.tab(tab)
        if figure:   # a background tab draws when it is shown
            page.wait_for(lambda figure=figure: "step 39" in (page.model_text(figure) or ""), f"{figure} to draw")
            if figure == "kv-mass":  # below it, every step's share of attention per cached position
                page.wait_for(lambda: "layer 0 · steps 0-39" in (page.model_text("kv-mass-steps") or ""),
                              "the step x position heatmap")
        else:
            page.wait_for(lambda: "tensor-parallel size" in page.page.content() or
                          page.page.locator("text=tensor-parallel size").count(), "the run view")
        page.page.wait_for_timeout(500)
        page.shot(shot)
    assert page.page.locator("text=tensor-parallel size").count() >= 1

    assert page.errors == []


def test_compare_tab_overlays_another_run(server, open_page):
    page = open_page(server + "?trace=replay")
    page.tab("Compare")
    page.wait_for(lambda: "choose a trace" in page.deep_text("wb-note-CompareView"),
                  "the compare tab's prompt to choose")
    page.select(".wb-compare-other", "broken")                   # a damaged store: said, nothing drawn
    page.wait_for(lambda: "cannot compare with broken" in page.deep_text("wb-note-CompareView"),
                  "the note on the broken trace")
    page.select(".wb-compare-other", "replay-b")
    page.wait_for(lambda: (page.model_text("compare-hist") or "").startswith("layer 0 · mlp.act.post · all steps"),
                  "the histograms of both runs")
    page.wait_for(lambda: "b - a" in page.deep_text("wb-compare-table"), "the table of differences")
    assert "the prompts differ from token 0" in page.deep_text("wb-compare-runs")
    assert "40 steps, 40 summed" in page.deep_text("wb-compare-runs")
    page.select(".wb-layer", "layer 2")                           # follows the selected layer
    page.wait_for(lambda: (page.model_text("compare-hist") or "").startswith("layer 2 ·"), "layer 2's histograms")
    page.page.wait_for_timeout(500)
    page.shot("compare")
    # how each head's sink score changed, below the table (the page scrolls inside its main area)
    assert "largest change: layer" in page.deep_text("wb-compare-heads-note")
    assert (page.model_text("compare-heads") or "").startswith("first-token (sink) score, b - a")
    # the attention weights compare only over tokens both runs share: these two prompts share none
    page.select(".wb-compare-head-score", "largest |b - a| of the attention weights")
    page.wait_for(lambda: "share no token" in page.deep_text("wb-compare-heads-note"), "the weights' note")
    page.page.locator(".wb-compare-heads-note").scroll_into_view_if_needed()
    page.page.wait_for_timeout(300)
    page.page.screenshot(path=str(SHOTS / "compare_heads.png"))
    assert page.errors == []


def test_changing_layer_or_head_changes_the_heatmap(server, open_page):
    page = open_page(server + "?trace=replay")
    first = page.image_digest("attention-main-source")
    page.select(".wb-layer", "layer 2")
    page.wait_for(lambda: "layer 2 · head 0" in page.model_text("attention-main"), "layer 2")
    second = page.image_digest("attention-main-source")
    assert second != first
    page.select(".wb-head", "head 3")
    page.wait_for(lambda: "layer 2 · head 3" in page.model_text("attention-main"), "head 3")
    third = page.image_digest("attention-main-source")
    assert third != second and third[0] == second[0]     # same shape (same step), different weights
    grid_before = page.image_digest("attention-grid-source")
    page.select(".wb-layer", "layer 1")
    page.wait_for(lambda: "layer 1 · head 3" in page.model_text("attention-main"), "layer 1")
    page.wait_for(lambda: page.image_digest("attention-grid-source") != grid_before, "the head grid to follow the layer")
    page.shot("attention_layer1_head3")
    assert page.errors == []


def test_replay_slider_and_player_move_every_view(server, open_page):
    page = open_page(server + "?trace=replay")
    track = page.page.locator(".wb-step .noUi-base")
    box = track.bounding_box()
    track.click(position={"x": box["width"] * 10 / 39, "y": box["height"] / 2})   # tap the track near step 10
    title = page.wait_for(lambda: (t := page.model_text("attention-main")) and "step 39" not in t and t,
                          "the attention view to leave step 39")
    step = int(title.rsplit("step ", 1)[1])
    assert 7 <= step <= 13, title
    page.wait_for(lambda: page.tokens() == (16 + 39, 39 - (step + 1)), f"tokens sampled after step {step} to fade")
    # every view shows that step (hidden tabs catch up when they are shown)
    titles = {}
    for tab, names in (("Attention", ("attention-main",)), ("Heads", ("heads-matrix",)),
                       ("Perceiver", ("perceiver-cross",)), ("KV cache", ("kv-mass",)),
                       ("Activations", ("activations-hist", "activations-by-layer")), ("Time", ("timing-layers",)),
                       ("Communication", ("comm-layers", "comm-timeline"))):
        page.tab(tab)
        for n in names:
            titles[n] = page.wait_for(lambda n=n: f"step {step}" in (page.model_text(n) or "") and page.model_text(n),
                                      f"{n} at step {step}")
        page.shot(f"replay_{tab.split()[0].lower()}")
    page.tab("Attention")
    assert f"steps 0..{step}" not in titles["activations-hist"]
    page.shot("replay_mid")
    page.page.locator(".wb-play button").click()
    page.wait_for(lambda: int(page.model_text("attention-main").rsplit("step ", 1)[1]) >= step + 3,
                  "the player to advance", timeout=30)
    page.page.locator(".wb-play button").click()          # pause
    page.wait_for(lambda: "Play" in page.page.locator(".wb-play button").inner_text(), "the player to pause")
    page.page.wait_for_timeout(1000)
    paused_at = page.model_text("attention-main")
    page.page.wait_for_timeout(1500)
    assert page.model_text("attention-main") == paused_at
    assert page.errors == []


def test_clicking_a_token_selects_its_step(server, open_page):
    page = open_page(server + "?trace=replay")
    page.page.locator('.tok[data-pos="21"]').click()      # sampled at step 5 (prompt of 16 positions)
    page.wait_for(lambda: "step 5" in page.model_text("attention-main"), "step 5 after the click")
    page.wait_for(lambda: page.tokens()[1] == 39 - 6, "tokens after step 5 to fade")
    assert page.errors == []


def test_keyboard_shortcuts_step_and_switch_layer_and_head(server, open_page):
    page = open_page(server + "?trace=replay")

    def title_has(text: str) -> bool:
        return text in (page.model_text("attention-main") or "")

    page.page.locator(".wb-step").click(position={"x": 1, "y": 1})   # focus on the page, not on a field
    for key, expected in (("ArrowLeft", "head 0 · step 38"), ("Shift+ArrowLeft", "head 0 · step 28"),
                          ("Home", "head 0 · step 0"), ("ArrowRight", "head 0 · step 1"),
                          ("End", "head 0 · step 39"), ("ArrowDown", "layer 1 · head 0"), ("]", "layer 1 · head 1")):
        page.page.keyboard.press(key)
        page.wait_for(lambda expected=expected: title_has(expected), f"{key} to show {expected}")
    page.select(".wb-layer", "layer 3")                                # typing into a select changes only the select
    page.wait_for(lambda: title_has("layer 3 · head 1 · step 39"), "layer 3 from the select")
    page.page.locator(".wb-layer select").press("ArrowUp")
    page.wait_for(lambda: title_has("layer 2 · head 1"), "the select's own arrow key")
    page.page.wait_for_timeout(500)
    assert title_has("layer 2 · head 1 · step 39")                      # the step did not move with it
    assert page.errors == []


def test_a_link_opens_the_page_at_its_step_layer_head_and_tab(server, open_page):
    page = open_page(server + "?trace=replay&tab=heads&step=10&layer=2&head=3")
    assert "layer 2 · head 3 · step 10" in page.model_text("attention-main")
    page.wait_for(lambda: "step 10" in (page.model_text("heads-matrix") or ""), "the Heads tab at step 10")
    link = page.page.locator(".wb-link a")
    assert link.get_attribute("href") == "?trace=replay&tab=heads&step=10&seq=0&layer=2&head=3"
    page.page.keyboard.press("ArrowRight")
    page.wait_for(lambda: "step=11" in (link.get_attribute("href") or ""), "the link to follow the step")
    assert page.errors == []


def test_refused_and_broken_traces_show_an_error_in_the_page(server, open_page, traces):
    for query, expected in (("../../etc", "outside the served directory"),
                            ("broken", "missing spec")):
        page = open_page(server + f"?trace={query}", ready="error")
        page.wait_for(lambda: expected in page.error_text(), f"error {expected!r}")
        assert page.page.locator(".bk-tab", has_text="Attention").count() == 1   # the page still works
        assert page.errors == []
    page.shot("error_broken_trace")


def test_live_generation_appears_in_the_page_without_reload(server, open_page, traces, model_dir):
    """The page follows a real generation commit by commit, however fast the machine.

    The store grows in jumps (the recorder queues decode steps in batches, the writer flushes them a
    few times a second) and generation runs faster than a browser can be polled. So at every new
    commit the test's reader sees, it holds the generator and its trace worker still (SIGSTOP to
    their process group), checks that the page catches up with exactly what the store holds, and
    lets the run go on (SIGCONT). The first pause is the run's first appearance (the page builds its
    views then); the LIVE_PAUSES pauses after it time how far the page is behind a run it follows.
    """
    live = traces / "live"
    page = open_page(server + "?trace=live", ready="error")
    page.wait_for(lambda: "waiting" in page.error_text(), "the waiting note")
    page.page.evaluate("window.__no_reload = 42")
    n_prompt = len(PROMPT.encode()) + 1                    # bytes + <bos>
    final = n_prompt + LIVE_TOKENS
    gen = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir), "--prompt", PROMPT,
         "--max-new-tokens", str(LIVE_TOKENS), "--temperature", "0.8", "--device", "cpu", "--record", str(live)],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    shown: list[int] = []        # token spans in the page at each pause
    lags: list[float] = []       # seconds from the reader seeing a commit to the page showing it (after the first)
    reader = None
    try:
        deadline = time.monotonic() + 240
        while gen.poll() is None and len(lags) < LIVE_PAUSES:
            assert time.monotonic() < deadline, f"paused only at {shown} tokens in 240 s"
            if reader is None:
                if (live / "zarr.json").exists():
                    try:
                        reader = open_trace(live)
                    except Exception:
                        reader = None
                time.sleep(0.005)
                continue
            reader.refresh()
            if reader.n_positions == (shown[-1] if shown else 0):   # nothing new committed
                time.sleep(0.005)
                continue
            t_stored = time.monotonic()
            with held(gen.pid):
                reader.refresh()                           # what the store holds while the run stands still
                stored = reader.n_positions
                if stored == final:                        # the run committed its last step: nothing to follow
                    break
                page.wait_for(lambda: page.tokens()[0] == stored, f"the page to show {stored} tokens "
                              f"(shows {page.tokens()[0]}, error {page.error_text()!r})", timeout=20)
                if shown:
                    lags.append(time.monotonic() - t_stored)
                shown.append(stored)
                if len(shown) == 2:
                    page.shot("live_generation")
        assert len(lags) >= LIVE_PAUSES, (f"the run ended or committed its last step after pausing only at {shown} "
                                           f"tokens (exit code {gen.poll()}): the live model is too fast for this test")
        assert gen.wait(timeout=180) == 0, gen.stderr.read().decode()[-2000:]
        page.wait_for(lambda: page.tokens()[0] == final, f"all {final} tokens (shows {page.tokens()[0]}, "
                      f"error {page.error_text()!r})", timeout=20)
    finally:
        end_group(gen)
    assert shown == sorted(set(shown)) and 0 < shown[0] and shown[-1] < final, shown   # grew while generating
    assert page.page.evaluate("window.__no_reload") == 42  # ...and the page never reloaded
    # The target is under a second behind the store; this machine's 2 cores are shared by
    # generation, server, browser and other jobs, so the median must meet it and none be over 3 s.
    print(f"live: pauses at {shown} tokens, lags {[round(l, 2) for l in lags]} s")
    lags.sort()
    assert lags[len(lags) // 2] <= 1.0 and lags[-1] <= 3.0, lags
    page.wait_for(lambda: "complete" in page.deep_text("wb-status"), "status complete")
    assert page.errors == []


def _non_loopback_addresses() -> list[str]:
    import socket
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        return []
    return sorted({i[4][0] for i in infos if not i[4][0].startswith("127.")})


def test_generate_serve_shows_the_run_then_serves_until_ctrl_c(browser, model_dir, tmp_path):
    import socket
    import threading
    port = free_port()
    record = tmp_path / "served_run"
    # an earlier run beside it, written "later" so that a page opening the newest trace would show it
    write_synthetic_trace(tmp_path / "earlier_run", n_steps=6, n_layers=2, n_heads=2)
    future = time.time() + 3600
    os.utime(tmp_path / "earlier_run" / "zarr.json", (future, future))
    gen = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir), "--prompt", "abc",
         "--max-new-tokens", "40", "--device", "cpu", "--record", str(record), "--serve", "--port", str(port)],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(gen.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any(l.startswith("dashboard: ") for l in lines) and time.monotonic() < deadline:
            assert gen.poll() is None, "".join(lines)
            time.sleep(0.1)
        url = next(l.split()[1] for l in lines if l.startswith("dashboard: "))
        assert url == f"http://127.0.0.1:{port}/dashboard"
        for address in _non_loopback_addresses():          # reachable from this machine only
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=1).close()
        page = Page(browser, url, ready="heatmap")
        page.wait_for(lambda: page.tokens()[0] == 4 + 40, "the whole run in the page", timeout=120)  # <bos>abc + 40
        page.wait_for(lambda: any("still at" in l for l in lines), "generation to finish")
        # the runs beside it are listed, and the Compare tab sets this run beside them
        options = page.page.locator(".wb-trace select option").all_inner_texts()
        assert sorted(options) == ["earlier_run", "served_run"]
        assert page.page.locator(".wb-trace select").input_value() == "served_run"
        page.tab("Compare")
        page.wait_for(lambda: "choose a trace" in page.deep_text("wb-note-CompareView"), "the Compare tab")
        assert gen.poll() is None                           # still serving after generation
        page.page.reload()
        page.wait_for(lambda: page.tokens()[0] == 44 and "complete" in page.deep_text("wb-status"),
                      "the finished run after a reload")
        assert page.errors == []
        page.close()
        gen.send_signal(signal.SIGINT)                      # Ctrl-C stops the dashboard
        assert gen.wait(timeout=30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if gen.poll() is None:
            gen.kill()

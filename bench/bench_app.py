"""Benchmark: the web page under 8 browsers at once (issue 27): the latency of a localization, from the click to
the heatmap on the page, with gradio's queue computing 1 or 2 requests at a time (app.py --concurrency).

Run from the repository root:  python bench/bench_app.py [--quick]

Each round starts app.py on the demo model (runs/demo/best.pth.tar when `make demo` made it, else the demo preset's
network with random weights: the same computation) on a free port of 127.0.0.1, opens 8 headless Chromium pages at
once (Debian's /usr/bin/chromium, driven by Playwright's async API), and has each localize 3 phrases on a demo image
--requests times; the settings alternate round by round (A B A B), after a warm-up round of each. Prints p50 and
p95 over every request of a setting, and the requests per second.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from misc import config, presets  # noqa: E402
from misc.data.datasets import prepare_dataset  # noqa: E402
from misc.store.checkpoint import atomic_save  # noqa: E402
from models.joint import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PHRASES = "a red disc\na blue square\na green triangle"


def checkpoint(folder: Path) -> Path:
    """The demo model if `make demo` trained it, else the demo preset's network with random weights."""
    trained = config.RUNS / "demo" / "best.pth.tar"
    if trained.is_file():
        return trained
    prepare_dataset("demo")
    model_cfg, train_cfg = presets.preset("demo")
    torch.manual_seed(0)
    path = folder / "random-demo.pth.tar"
    atomic_save({"format": "dsve-loc", "version": 1,
                 "config": {"model": asdict(model_cfg), "train": asdict(train_cfg),
                            "word_vectors": str(config.DEMO_DIR / "words" / "demo_word2vec.bin")},
                 "model": build_model(model_cfg).state_dict(), "epoch": 0, "best_rsum": 0.0, "metrics": {}}, path)
    return path


def start(model: Path, concurrency: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "-p", str(model), "--port", str(port),
                                "--concurrency", str(concurrency), "--device", "cpu"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=5):
                return process, url
        except OSError:
            time.sleep(1)
    process.kill()
    raise SystemExit(f"app.py did not answer at {url}")


async def browse(browser, url: str, image: Path, requests: int) -> list[float]:
    page = await browser.new_page()
    await page.goto(url)
    await page.locator("#image input[type=file]").set_input_files(str(image))
    await page.locator("#image img").first.wait_for(timeout=60_000)
    phrases, latencies = PHRASES.splitlines(), []
    for number in range(requests):
        # each request lists the phrases in another order, so the gallery's first panel changes (a panel's address is
        # a hash of its pixels: the same request twice would give the same page, nothing to wait for)
        turn = number % len(phrases)
        await page.locator("#phrases textarea").fill("\n".join(phrases[turn:] + phrases[:turn]))
        panels = page.locator("#heatmaps img")
        before = await panels.first.get_attribute("src") if await panels.count() else None
        started = time.perf_counter()
        await page.locator("#localize").click()
        await page.wait_for_function("([selector, old]) => { const panel = document.querySelector(selector); "
                                     "return panel !== null && panel.getAttribute('src') !== old; }",
                                     arg=["#heatmaps img", before], timeout=600_000)
        latencies.append(time.perf_counter() - started)
    await page.close()
    return latencies


async def round_of(url: str, image: Path, browsers: int, requests: int) -> tuple[list[float], float]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        started = time.perf_counter()
        results = await asyncio.gather(*(browse(browser, url, image, requests) for _ in range(browsers)))
        wall = time.perf_counter() - started
        await browser.close()
    return [latency for latencies in results for latency in latencies], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 browsers, 1 request each, 1 round")
    parser.add_argument("--browsers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="localizations per browser and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.browsers, args.requests, args.rounds = 2, 1, 1
    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"{CHROMIUM} is missing: make browser installs it")
    with tempfile.TemporaryDirectory() as folder:
        model = checkpoint(Path(folder))
        image = sorted((config.DEMO_DIR / "images" / "val2014").glob("*.jpg"))[0]
        print(f"machine: {machine()}")
        print(f"model: {model}; {args.browsers} browsers at once, {args.requests} localizations of 3 phrases each "
              f"per round, {args.rounds} rounds per setting, alternating after a warm-up round of each")
        latencies: dict[int, list[float]] = {1: [], 2: []}
        rates: dict[int, list[float]] = {1: [], 2: []}
        for number in range(args.rounds + 1):
            for concurrency in latencies:
                process, url = start(model, concurrency)
                try:
                    found, wall = asyncio.run(round_of(url, image, args.browsers, args.requests))
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                if number:  # round 0 warms up
                    latencies[concurrency] += found
                    rates[concurrency].append(len(found) / wall)
        for concurrency, found in latencies.items():
            cut = statistics.quantiles(found, n=20)
            print(f"--concurrency {concurrency}: {len(found)} localizations, p50 {statistics.median(found):.2f} s, "
                  f"p95 {cut[18]:.2f} s, {statistics.mean(rates[concurrency]):.2f} localizations/s")


if __name__ == "__main__":
    main()

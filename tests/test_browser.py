"""The web page in a real headless browser (Debian's chromium + chromedriver, driven by selenium): type a
prompt, press Generate, watch progress, hear the stream start, get a playable, downloadable file.

Skipped when chromium or chromedriver is missing, unless pytest runs with --require-browser (CI does), which
turns the skip into a failure. Debian/Ubuntu: apt-get install chromium chromium-driver.
"""
from __future__ import annotations

import shutil
import time

import pytest

from conftest import running_server

pytestmark = pytest.mark.browser


def chrome(require: bool):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        why = "the browser test needs chromium and chromedriver (apt-get install chromium chromium-driver)"
        if require:
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def poll(what, timeout=60, every=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def test_type_generate_see_progress_play_and_download(model, tmp_path, pytestconfig):
    browser = chrome(pytestconfig.getoption("--require-browser"))
    try:
        with running_server(model, tmp_path) as (url, service):
            browser.get(url + "/")
            poll(lambda: "parameters" in browser.find_element("id", "model").text)       # model info shown
            browser.find_element("id", "prompt").send_keys("lofi hip hop beat with mellow piano")
            duration = browser.find_element("id", "duration")
            duration.clear()
            duration.send_keys("8")
            browser.find_element("id", "seed").send_keys("0")
            browser.find_element("id", "generate").click()

            # progress while it runs, and the live stream already playing in the <audio> element
            seen = poll(lambda: browser.execute_script(
                "const p = document.getElementById('progress').value, a = document.getElementById('player');"
                "return p > 0 && p < 1 && a.src.includes('/stream') ? [p, a.readyState] : null;"))
            assert 0 < seen[0] < 1
            poll(lambda: browser.execute_script(
                "const a = document.getElementById('player'); return a.readyState >= 2 && a.currentTime > 0;"))

            # done: progress full, download link, waveform drawn, the file decodes to 8 s of audio
            poll(lambda: browser.find_element("id", "download").is_displayed())
            assert browser.execute_script("return document.getElementById('progress').value") == 1
            href = browser.find_element("id", "download").get_attribute("href")
            assert href.startswith("blob:")                 # fetched with the key in a header, not in the URL
            browser.set_script_timeout(30)
            seconds = browser.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "fetch(arguments[0]).then(r => r.arrayBuffer())"
                ".then(b => new OfflineAudioContext(1, 1, 32000).decodeAudioData(b))"
                ".then(a => done(a.duration), e => done(String(e)));", href)
            assert abs(seconds - 8.0) < 0.05
            poll(lambda: browser.execute_script(
                "const c = document.getElementById('wave');"
                "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false;"))
            # a file <audio> can play: swap the player to it and wait for its metadata
            browser.execute_script("const a = document.getElementById('player'); a.src = arguments[0]; a.load();",
                                   href)
            poll(lambda: browser.execute_script(
                "const a = document.getElementById('player'); return a.readyState >= 1 && a.duration > 7.9;"))
            # the history lists the job
            poll(lambda: "lofi hip hop" in browser.find_element("id", "history").text)
    finally:
        browser.quit()


def page_status(browser) -> str:
    return browser.find_element("id", "status").text


def test_reload_keeps_the_job_and_cancel_stops_it(model, tmp_path, pytestconfig):
    """Leaving or reloading the page does not cancel the job it plays (the page streams it with
    cancel_on_leave=false): after a reload the page follows it again to the end. Cancel does stop a job, and
    a bad field is named in the error line."""
    browser = chrome(pytestconfig.getoption("--require-browser"))
    try:
        with running_server(model, tmp_path) as (url, service):
            browser.get(url + "/")
            poll(lambda: "parameters" in browser.find_element("id", "model").text)
            duration = browser.find_element("id", "duration")
            duration.clear()
            browser.find_element("id", "generate").click()
            poll(lambda: "duration:" in browser.find_element("id", "error").text)          # the field, named

            duration.send_keys("9")
            browser.find_element("id", "prompt").send_keys("slow ambient drone")
            browser.find_element("id", "generate").click()
            poll(lambda: service.live and 0 < next(iter(service.live.values())).complete_frames)
            job = next(iter(service.live))
            browser.refresh()
            poll(lambda: page_status(browser).startswith("done"), timeout=120)
            assert service.job(job)["status"] == "done"
            poll(lambda: browser.find_element("id", "download").is_displayed())

            browser.find_element("id", "prompt").send_keys(" again")
            browser.find_element("id", "generate").click()
            poll(lambda: browser.find_element("id", "cancel").is_displayed())
            poll(lambda: service.live)
            job = next(iter(service.live))
            browser.find_element("id", "cancel").click()
            poll(lambda: service.job(job)["status"] == "cancelled", timeout=30)
            poll(lambda: "cancelled" in page_status(browser) and not browser.find_element("id", "cancel").is_displayed())
    finally:
        browser.quit()



def test_with_an_api_key_the_stream_plays_from_a_signed_link(model, tmp_path, pytestconfig):
    """Behind an API key the page sends the key in headers; its <audio> element, which cannot, plays the job's
    signed stream link: the key appears in no URL the page makes."""
    browser = chrome(pytestconfig.getoption("--require-browser"))
    try:
        with running_server(model, tmp_path, api_key="s3cret") as (url, service):
            browser.get(url + "/")
            browser.execute_script("localStorage.setItem('musicgen-key', 's3cret');")
            browser.refresh()
            poll(lambda: "parameters" in browser.find_element("id", "model").text)
            browser.find_element("id", "prompt").send_keys("lofi hip hop beat")
            duration = browser.find_element("id", "duration")
            duration.clear()
            duration.send_keys("4")
            browser.find_element("id", "generate").click()
            src = poll(lambda: browser.execute_script(
                "const a = document.getElementById('player'); return a.src.includes('/stream') ? a.src : null;"))
            assert "sig=" in src and "s3cret" not in src
            poll(lambda: browser.execute_script(
                "const a = document.getElementById('player'); return a.readyState >= 2 && a.currentTime > 0;"))
            poll(lambda: page_status(browser).startswith("done"), timeout=120)
            urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
            assert urls and not any("s3cret" in u for u in urls)
    finally:
        browser.quit()

"""Open a page in headless Chromium (the distribution's package) through selenium, and report
what a person would see: console errors, network requests, each plot's rendered size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths when both are installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_page(path: Path, screenshot: Path | None = None, width: int = 1280) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    try:
        d.get(Path(path).resolve().as_uri())
        WebDriverWait(d, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
        plots = d.execute_script("""
            return Array.from(document.querySelectorAll('.js-plotly-plot')).map(p => {
                const svg = p.querySelector('svg.main-svg');
                const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
                return {id: p.id, width: r.width, height: r.height,
                        marks: p.querySelectorAll('.point, .bars path, .scatterlayer path, .trace').length};
            });""")
        sections = d.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
        rows = d.execute_script("return document.querySelectorAll('table tbody tr').length")
        height = d.execute_script("return document.body.scrollHeight")
        if screenshot:
            d.set_window_size(width, min(height + 100, 16000))
            d.save_screenshot(str(screenshot))
        console = [e for e in d.get_log("browser")]
        requests = []
        for entry in d.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                requests.append(msg["params"]["request"]["url"])
        return {"plots": plots, "sections": sections, "rows": rows, "console": console, "requests": requests}
    finally:
        d.quit()

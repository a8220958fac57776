"""Open report pages in headless Chromium, check them as the test suite does, and save the first screen.

    python docs/screenshot.py RUN/report.html docs/report_run.png [PAGE PNG ...]

Each page must load with no severe console message and every figure decoded with a size; the PNG is the
first 1200x900 screen. Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser``) and selenium
(the ``test`` extra). Exit code 1 names the first page that fails a check.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="imgcls-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1200,900", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager never looks for (or downloads) a browser or driver
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options), profile


def check(browser, page: Path) -> str | None:
    """None when the page passes; else what is wrong."""
    from selenium.webdriver.common.by import By

    browser.get(page.resolve().as_uri())
    if browser.execute_script("return document.readyState") != "complete":
        return "did not finish loading"
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    if severe:
        return f"console: {severe[0]}"
    figures = browser.find_elements(By.CSS_SELECTOR, "img, svg")
    if not figures:
        return "no figure"
    for f in figures:
        if not (f.size["width"] > 0 and f.size["height"] > 0):
            return f"figure without a size: {f.get_attribute('alt')}"
        if f.tag_name == "img" and not browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", f):
            return f"figure not decoded: {f.get_attribute('alt')}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        print("screenshot: headless Chromium not installed (make browser)", file=sys.stderr)
        return 2
    browser, profile = driver()
    try:
        for page, png in zip(argv[::2], argv[1::2]):
            problem = check(browser, Path(page))
            if problem:
                print(f"{page}: {problem}", file=sys.stderr)
                return 1
            browser.save_screenshot(png)
            print(f"{page}: no console errors, every figure drawn -> {png}")
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

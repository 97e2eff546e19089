"""The HTML goodput report in headless Chromium: the numbers shown are the JSON's, and it is self-contained."""

import json

from browser import full_page_screenshot
from goodput_logs import hand_log
from selenium.webdriver.common.by import By

from stalwart.goodput import (
    CATEGORIES,
    PRODUCTIVE,
    compute_goodput,
    render_html,
    to_json,
)


def test_html_report_shows_the_json_numbers(chromium, tmp_path):  # noqa: F811
    events = hand_log()  # the hand-computed two-node job with a fault and a restart
    report = compute_goodput(events)
    data = json.loads(json.dumps(to_json(report)))
    page = tmp_path / "goodput.html"
    page.write_text(render_html(report, events), encoding="utf-8")
    chromium.get(page.as_uri())

    assert chromium.find_element(By.ID, "goodput-pct").text == f"{100 * data['goodput']:.2f} %"
    assert float(chromium.find_element(By.ID, "wall-seconds").text.replace(",", "")) == round(data["wall_seconds"], 2)
    shown = {}
    for row in chromium.find_elements(By.CSS_SELECTOR, "#categories tr[data-category]"):
        seconds = float(row.find_element(By.CLASS_NAME, "seconds").text.replace(",", ""))
        shown[row.get_attribute("data-category")] = seconds
    expected = {PRODUCTIVE: data["productive_seconds"], **data["badput"]}
    assert set(shown) == {PRODUCTIVE, *CATEGORIES}
    assert all(abs(shown[c] - expected[c]) <= 0.005 for c in expected), (shown, expected)
    assert len(chromium.find_elements(By.CSS_SELECTOR, "#incidents tr[data-incident]")) == len(data["incidents"]) == 1

    # Self-contained: three matplotlib plots decoded from data URIs, nothing fetched from anywhere.
    images = chromium.execute_script(
        "return Array.from(document.images).map(i => [i.src.slice(0, 22), i.complete, i.naturalWidth])"
    )
    assert len(images) == 3 and all(src == "data:image/png;base64," and ok and w > 300 for src, ok, w in images), images
    fetched = chromium.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith("data:") for name in fetched), fetched

    shot = full_page_screenshot(chromium, tmp_path / "goodput-report.png")
    assert shot.stat().st_size > 20_000

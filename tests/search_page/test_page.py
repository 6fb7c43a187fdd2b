"""The search page, used as a person would: type, upload, look, play."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait


def wait(browser, cond, timeout=30):
    return WebDriverWait(browser, timeout).until(cond)


def search(browser, server, text, modality="all"):
    browser.get(server + "/")
    wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    Select(browser.find_element(By.ID, "modality")).select_by_value(modality)
    q = browser.find_element(By.ID, "q")
    q.clear()
    q.send_keys(text)
    browser.find_element(By.ID, "go").click()
    return results(browser)


def results(browser):
    wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    return browser.find_elements(By.CSS_SELECTOR, "#results .hit")


def thumbnail_loaded(browser, hit):
    img = hit.find_element(By.CSS_SELECTOR, "img.thumb")
    wait(browser, lambda b: b.execute_script("return arguments[0].complete", img))
    return browser.execute_script("return arguments[0].naturalWidth", img)


def test_a_text_query_shows_the_matching_image_first_with_its_thumbnail(browser, server, artifacts):
    hits = search(browser, server, "a large red star")
    assert len(hits) == 16
    first = hits[0]
    assert first.get_attribute("data-uri").endswith("/large-red-star-right.png")
    assert first.find_element(By.CSS_SELECTOR, ".name").text == "large-red-star-right.png"
    assert thumbnail_loaded(browser, first) > 0
    scores = [float(h.find_element(By.CSS_SELECTOR, ".score").text) for h in hits]
    assert scores == sorted(scores, reverse=True)
    browser.save_screenshot(str(artifacts / "search-page-text.png"))


def test_an_uploaded_image_finds_itself(browser, server, media, artifacts):
    browser.get(server + "/")
    wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    query = media / "media" / "small-purple-cross-left.png"
    browser.find_element(By.ID, "image").send_keys(str(query))
    hits = results(browser)
    assert hits[0].get_attribute("data-uri").endswith("/small-purple-cross-left.png")
    assert float(hits[0].find_element(By.CSS_SELECTOR, ".score").text) > 0.999
    assert thumbnail_loaded(browser, hits[0]) > 0
    assert browser.find_element(By.ID, "query-image").is_displayed()
    browser.save_screenshot(str(artifacts / "search-page-image.png"))


def test_a_video_segment_shows_its_frame_and_time_and_plays_from_its_start(browser, server, artifacts):
    hits = search(browser, server, "a large orange cross", modality="video")
    assert hits and all(h.get_attribute("data-kind") == "video" for h in hits)
    first = hits[0]
    # make-scenes' slideshow shows the large orange cross from 8 to 12 s.
    assert first.find_element(By.CSS_SELECTOR, ".when").text == "▶ 8.0–12.0 s"
    assert thumbnail_loaded(browser, first) > 0
    first.click()
    video = wait(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#viewer video")))
    assert "#t=8" in video.get_attribute("src")
    # The browser fetched the file (Range requests) and seeked into the segment.
    wait(browser, lambda b: b.execute_script("return arguments[0].readyState", video) >= 1)
    t = browser.execute_script("return arguments[0].currentTime", video)
    assert 8.0 <= t <= 12.0, t
    browser.save_screenshot(str(artifacts / "search-page-video.png"))


@pytest.mark.parametrize(
    "path",
    [
        "/media/0/999",
        "/media/0/-1",
        "/media/1/0",
        "/media/0/..%2F..%2F..%2Fetc%2Fpasswd",
        "/media/../../etc/passwd",
        "/thumb/0/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/media/%2Fetc%2Fpasswd/0",
        "/etc/passwd",
        "/../../etc/passwd",
    ],
)
def test_nothing_but_table_rows_is_served(server, path):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server + path)
    assert e.value.code == 404

from conformance.site import listing


def test_side_by_side_page_is_current():
    """docs/side_by_side.md is cut from the four model.py files; `make docs` rewrites it."""
    assert listing.OUTPUT.read_text() == listing.render()


def test_every_backend_defines_every_building_block():
    for title, package in listing.BACKENDS.items():
        defined = listing.definitions(f"{package}/model.py")
        missing = [names for names in listing.BLOCKS if not any(n in defined for n in names)]
        assert not missing, f"{title}: {missing}"

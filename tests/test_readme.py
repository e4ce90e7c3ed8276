from mlsys24.paths import REPO_ROOT


def test_readme_paper_table_is_current():
    from mlsys24.papers import README_END, README_START, markdown_table

    text = (REPO_ROOT / "README.md").read_text()
    table = text.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert table == markdown_table(), "README paper table is stale: python -m mlsys24.papers --update-readme"


def test_readme_gallery_is_current():
    from mlsys24.papers import GALLERY_END, GALLERY_START, markdown_gallery

    text = (REPO_ROOT / "README.md").read_text()
    body = text.split(GALLERY_START, 1)[1].split(GALLERY_END, 1)[0].strip()
    assert body == markdown_gallery().strip(), "README gallery is stale: python -m mlsys24.papers --update-readme"

"""mkdocs hooks (mkdocs.yml `hooks:`): generated source pages, and directives expanded in every page."""

from mkdocs.structure.files import File

from conformance.site import pages, snippets


def on_pre_build(config):
    snippets.run_all(snippets.snippets())  # all at once; the pages then read the cache


def on_files(files, config):
    for src_uri, content in pages.generated_pages().items():
        files.append(File.generated(config, src_uri, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    return pages.expand(markdown, page.file.src_uri)

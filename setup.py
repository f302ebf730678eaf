from pathlib import Path

from setuptools import setup

here = Path(__file__).parent


def files(folder):
    return [str(p.relative_to(here)) for p in sorted((here / folder).rglob("*")) if p.is_file()]


setup(
    name="gelf",
    version="0.1.0",
    description="Ethernet over WebSockets, with a web browser as the wire",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    packages=["gelf", "gelf.mirror", "gelf.mirror.outputs"],
    python_requires=">=3.9",
    install_requires=["CherryPy>=18", "ws4py>=0.5.1", "cryptography>=41", "numpy>=1.24", "python-pytun>=2.4",
                      "prometheus-client>=0.16", "httptools>=0.6"],
    data_files=[("share/gelf/static", files("static")), ("share/gelf/templates", files("templates"))],
    entry_points={"console_scripts": ["gelf = gelf.cli:main", "gelf-mirror = gelf.mirror.cli:main"]},
)

"""Start the Streamlit app (what `make run` calls): `python -m ui.serve [streamlit run options]`.

Why not plain `streamlit run app.py`: Streamlit still treats a folder named `pages/` beside the entry
script as old-style automatic pages until the entry script has called st.navigation once, so a
shared link (/history?run=7) opened first after a restart would run that page alone, without the
app's navigation and runner check. Our pages/ are st.Page files of st.navigation; saying so before
the server starts makes every first request go through app.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from streamlit.runtime.pages_manager import PagesManager
from streamlit.web import cli

APP = Path(__file__).resolve().parent.parent / "app.py"


def main(argv: list[str] | None = None) -> None:
    PagesManager.uses_pages_directory = False
    sys.argv = ["streamlit", "run", str(APP), *(sys.argv[1:] if argv is None else argv)]
    cli.main()


if __name__ == "__main__":
    main()

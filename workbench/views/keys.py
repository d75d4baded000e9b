"""Keyboard shortcuts of the served dashboard: a page-wide key listener that tells Python which
key was pressed (not while the user types into a field or a select has the focus).

    ← / →          previous / next step (with Shift: 10 steps)
    Home / End     first / last committed step
    Space          play / pause
    ↑ / ↓          previous / next layer
    [ / ]          previous / next head
"""
from __future__ import annotations

import param
from panel.custom import JSComponent

KEYS = ("ArrowLeft", "ArrowRight", "Home", "End", " ", "ArrowUp", "ArrowDown", "[", "]")
HELP = "keys: ← → step (Shift: 10), Home End, Space play, ↑ ↓ layer, [ ] head"


class KeyListener(JSComponent):
    """Sets ``press`` to ``"[S-]KEY|n"`` (n counts presses, so a repeated key is a new value)."""

    press = param.String(default="", doc="the last shortcut pressed")

    _esm = """
    const KEYS = new Set(%s);
    export function render({ model }) {
      let n = 0;
      const onKey = (e) => {
        if (!KEYS.has(e.key) || e.ctrlKey || e.metaKey || e.altKey) return;
        const target = e.composedPath()[0];
        const tag = target && target.tagName ? target.tagName.toUpperCase() : "";
        if (["INPUT", "SELECT", "TEXTAREA"].includes(tag) || (target && target.isContentEditable)) return;
        if (target && target.getAttribute && target.getAttribute("role") === "slider") return;  // it steps itself
        e.preventDefault();  // no page scroll for arrows and space
        n += 1;
        model.press = `${e.shiftKey ? "S-" : ""}${e.key}|${n}`;
      };
      if (window.__wbKeyListener) document.removeEventListener("keydown", window.__wbKeyListener);
      window.__wbKeyListener = onKey;
      document.addEventListener("keydown", onKey);
      const el = document.createElement("span");
      el.className = "wb-keys";
      return el;
    }
    """ % (list(KEYS),)

    def key(self) -> tuple[str, bool]:
        """The last key pressed and whether Shift was held."""
        key = self.press.rsplit("|", 1)[0]
        return (key[2:], True) if key.startswith("S-") else (key, False)

"""A strip of clickable tokens (prompt, then generated text) rendered in the browser.

Tokens after the selected step are faded rather than hidden, so replay reads like scrubbing a video
and any future token can be clicked. New tokens arrive by appending (``extend``): the browser only
adds the new spans, and changing the step sends one integer.
"""
from __future__ import annotations

import param
from panel.custom import JSComponent


class TokenStrip(JSComponent):
    """Clickable token text. ``clicked`` is set to a position when the user clicks a token.

    Tokens are listed in order; ``positions`` gives each one's absolute position (a sequence of a
    padded batch skips its padding, so the i-th token need not sit at position i). ``n_prompt`` and
    ``n_visible`` count tokens of the list; ``selected`` and ``clicked`` are absolute positions.
    """

    tokens = param.List(default=[], doc="token texts, in order")
    positions = param.List(default=[], doc="absolute position of each token (default: its index)")
    n_prompt = param.Integer(default=0, doc="the first n_prompt tokens are the prompt")
    n_visible = param.Integer(default=0, doc="the first n_visible tokens exist at the selected step")
    probs = param.List(default=[], doc="per token: the probability it was sampled with (None: prompt; "
                                       "-1: not among the recorded candidates)")
    shade = param.Boolean(default=False, doc="shade generated tokens by probability: the less likely, the warmer")
    selected = param.Integer(default=-1, doc="highlighted position (absolute)")
    clicked = param.Integer(default=-1, doc="set by the browser: the position last clicked (absolute)")

    _stylesheets = ["""
    :host { display: block; }
    .strip { font: 14px/1.7 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
             word-break: break-all; padding: 8px 10px; background: #fbfbfd; border: 1px solid #e3e6ec;
             border-radius: 6px; max-height: 240px; overflow-y: auto; color: #1d2330; }
    .tok { cursor: pointer; border-radius: 3px; padding: 1px 0; transition: background .15s; }
    .tok:hover { outline: 1px solid #8aa4c8; }
    .tok.prompt { color: #4a5568; background: #eef1f6; }
    .tok.gen { background: #e3effd; }
    .tok.gen:nth-child(even) { background: #d5e6fb; }
    .tok.future { opacity: .22; }
    .tok.sel { background: #ffcf5c !important; color: #1d2330; outline: 2px solid #e0a100; }
    .nl { color: #9aa5b5; }
    .empty { color: #8a94a6; font-style: italic; }
    """]

    _esm = """
    function label(text) {
      // Show whitespace the model produced: newlines as a visible mark plus a real line break.
      return text.replace(/\\n/g, '\\u21b5\\n').replace(/\\t/g, '\\u2192   ');
    }
    export function render({ model, el }) {
      const box = document.createElement('div');
      box.className = 'strip';
      el.appendChild(box);
      let spans = [];
      function pos(i) { const p = model.positions[i]; return p === undefined ? i : p; }
      function cls(i) {
        let c = 'tok ' + (i < model.n_prompt ? 'prompt' : 'gen');
        if (i >= model.n_visible) c += ' future';
        if (pos(i) === model.selected) c += ' sel';
        return c;
      }
      function prob(i) { const p = model.probs[i]; return p === undefined ? null : p; }
      function shade(s, i) {
        const p = prob(i);
        // warmer the less likely; -1 (not among the candidates) is least likely of all
        s.style.background = model.shade && p !== null ? `rgba(230, 85, 13, ${(0.08 + 0.72 * (1 - Math.max(p, 0))).toFixed(3)})` : '';
      }
      function add(from) {
        const toks = model.tokens;
        for (let i = from; i < toks.length; i++) {
          const s = document.createElement('span');
          const p = pos(i);
          s.textContent = label(toks[i]);
          s.dataset.pos = p;
          s.className = cls(i);
          const pr = prob(i);
          s.title = 'position ' + p + (i < model.n_prompt ? ' (prompt)' : '') +
            (pr === null ? '' : pr < 0 ? ' · not among the recorded candidates' : ' · p = ' + pr.toFixed(3));
          shade(s, i);
          s.addEventListener('click', () => { model.clicked = p; });
          box.appendChild(s);
          spans.push(s);
        }
      }
      function rebuild() {
        const follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
        const n = model.tokens.length;
        if (n < spans.length) { box.innerHTML = ''; spans = []; }  // shrank: redraw
        if (spans.length === 0) { box.innerHTML = ''; }  // drop the 'no tokens yet' note
        // Same prefix as before: only the new tokens are added.
        add(spans.length);
        if (!n) { box.innerHTML = '<span class="empty">no tokens yet</span>'; spans = []; }
        if (follow) box.scrollTop = box.scrollHeight;
      }
      function restyle() { spans.forEach((s, i) => { s.className = cls(i); }); }
      function reshade() { spans.forEach((s, i) => shade(s, i)); }
      function reset() { box.innerHTML = ''; spans = []; rebuild(); }
      rebuild();
      model.on('tokens', rebuild);
      model.on(['n_visible', 'selected', 'n_prompt'], restyle);
      model.on('shade', reshade);
      model.on('msg:custom', (msg) => { if (msg.type === 'reset') reset(); });
    }
    """

    def replace(self, tokens: list[str], n_prompt: int, positions: list[int] | None = None,
                probs: list | None = None) -> None:
        """Show a different token list (another trace or sequence): the browser redraws from scratch."""
        with param.parameterized.batch_call_watchers(self):
            self.n_prompt = n_prompt
            self.positions = list(range(len(tokens)) if positions is None else positions)
            self.probs = as_sent(probs or [])
            self.tokens = list(tokens)
        self._send_msg({"type": "reset"})


def as_sent(probs: list) -> list:
    """Probabilities as the browser takes them: NaN (not among the candidates) becomes -1."""
    return [None if p is None else (-1.0 if p != p else round(float(p), 4)) for p in probs]

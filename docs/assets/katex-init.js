// Typesets the formulas that pymdownx.arithmatex (generic mode) leaves as \( \) and \[ \] in
// <span|div class="arithmatex">. KaTeX is vendored in docs/assets/katex (no CDN: works offline).
function fnlmRenderMath(root) {
  for (const el of root.querySelectorAll(".arithmatex")) {
    if (el.dataset.rendered) continue;
    const tex = el.textContent.trim();
    const display = tex.startsWith("\\[");
    const body = tex.replace(/^\\[\[(]/, "").replace(/\\[\])]$/, "");
    katex.render(body, el, {displayMode: display, throwOnError: false});
    el.dataset.rendered = "1";
  }
}
if (typeof document$ !== "undefined") {
  document$.subscribe(({body}) => fnlmRenderMath(body));
} else {
  document.addEventListener("DOMContentLoaded", () => fnlmRenderMath(document.body));
}

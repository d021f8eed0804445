// The "View at strength" slider: an edited version's own edit drawn at another strength, with no
// fit and no new version (the images' ?strength=). Earlier edits of its lineage keep theirs.
const DEBOUNCE_MS = 150;    // previews follow the slider once it rests this long

const $ = (id) => document.getElementById(id);

/** Show the slider for an edited version (at its own strength); hide it for an import. */
export function showViewStrength(version) {
  const row = $("view-strength-row");
  const own = version && version.kind === "edit" && Number.isFinite(version.strength) ? version.strength : null;
  row.hidden = own === null;
  if (own === null) return;
  const slider = $("view-strength");
  slider.min = String(Math.min(-1, Math.floor(own)));
  slider.max = String(Math.max(2, Math.ceil(own * 2)));
  slider.value = String(own);
  slider.dataset.own = String(own);
  label(own, own);
}

function label(value, own) {
  const out = $("view-strength-value");
  out.textContent = value === own ? `${value} (its own)` : String(value);
  out.dataset.value = String(value);
}

/** Call ``onChange(strength)`` once the slider rests (null: back to the version's own strength). */
export function wireViewStrength(onChange) {
  const slider = $("view-strength");
  let timer = null;
  const settle = (value) => {
    clearTimeout(timer);
    const own = Number(slider.dataset.own);
    label(value, own);
    timer = setTimeout(() => onChange(value === own ? null : value), DEBOUNCE_MS);
  };
  slider.addEventListener("input", () => settle(Number(slider.value)));
  $("view-strength-reset").addEventListener("click", () => {
    slider.value = slider.dataset.own;
    settle(Number(slider.dataset.own));
  });
}

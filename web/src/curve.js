// The edit's strength curve (a version's metrics.strength_curve): detected share and side effect
// against strength, the strength the service chose and the one the Strength field holds.

const PAD = { left: 34, right: 44, top: 10, bottom: 26 };
const DETECTED = "#5b9cff";
const SIDE = "#ff6b6b";
const CHOSEN = "#b7bcc6";
const SLIDER = "#ffd24d";

/** The curve in ``metrics`` as {points (sorted by strength), chosen, rule}; null when there is none. */
export function curveOf(metrics) {
  const c = metrics && metrics.strength_curve;
  if (!c || typeof c !== "object" || !Array.isArray(c.points)) return null;
  const points = c.points
    .filter((p) => p && Number.isFinite(p.strength) && Number.isFinite(p.detected) && Number.isFinite(p.side_effect))
    .slice().sort((a, b) => a.strength - b.strength);
  if (!points.length) return null;
  return { points, chosen: Number.isFinite(c.chosen) ? c.chosen : null, rule: typeof c.rule === "string" ? c.rule : "" };
}

/** ``key`` of the curve at strength ``s``, linearly between its points (null outside them). */
export function valueAt(curve, s, key) {
  const pts = curve.points;
  if (!Number.isFinite(s) || s < pts[0].strength || s > pts[pts.length - 1].strength) return null;
  for (let i = 1; i < pts.length; i++) {
    const a = pts[i - 1], b = pts[i];
    if (s <= b.strength) {
      const t = b.strength === a.strength ? 0 : (s - a.strength) / (b.strength - a.strength);
      return a[key] + t * (b[key] - a[key]);
    }
  }
  return pts[0][key];
}

/** The strength range drawn: the curve's points, the chosen strength and the slider's, from 0. */
function xRange(curve, slider) {
  const xs = [0, ...curve.points.map((p) => p.strength)];
  if (curve.chosen !== null) xs.push(curve.chosen);
  if (Number.isFinite(slider)) xs.push(slider);
  const lo = Math.min(...xs), hi = Math.max(...xs);
  return [lo, hi > lo ? hi : lo + 1];
}

/** Map pixels ↔ strength for a canvas of width ``w`` (click to set the strength). */
export function strengthAtX(curve, slider, w, x) {
  const [lo, hi] = xRange(curve, slider);
  const t = (x - PAD.left) / (w - PAD.left - PAD.right);
  return lo + Math.max(0, Math.min(1, t)) * (hi - lo);
}

function line(ctx, pts, color, dash = []) {
  ctx.strokeStyle = color;
  ctx.setLineDash(dash);
  ctx.beginPath();
  pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.stroke();
  ctx.setLineDash([]);
}

function series(ctx, pts, color) {
  ctx.lineWidth = 1.5;
  line(ctx, pts, color);
  ctx.fillStyle = color;
  for (const [x, y] of pts) ctx.fillRect(x - 2, y - 2, 4, 4);
}

/** Draw ``curve`` on ``canvas`` with the slider's strength (NaN: none); returns what it drew. */
export function drawCurve(canvas, curve, slider) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const [lo, hi] = xRange(curve, slider);
  const sideMax = Math.max(...curve.points.map((p) => p.side_effect), 1e-6);
  const X = (s) => PAD.left + ((s - lo) / (hi - lo)) * (w - PAD.left - PAD.right);
  const Y = (f) => PAD.top + (1 - f) * (h - PAD.top - PAD.bottom);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "10px system-ui, sans-serif";
  ctx.lineWidth = 1;
  line(ctx, [[PAD.left, PAD.top], [PAD.left, Y(0)], [w - PAD.right, Y(0)], [w - PAD.right, PAD.top]], "#4a505b");
  ctx.fillStyle = DETECTED;
  ctx.textAlign = "right";
  ctx.fillText("100%", PAD.left - 3, PAD.top + 8);
  ctx.fillText("0", PAD.left - 3, Y(0));
  ctx.fillStyle = SIDE;
  ctx.textAlign = "left";
  ctx.fillText(sideMax.toPrecision(2), w - PAD.right + 3, PAD.top + 8);
  ctx.fillText("0", w - PAD.right + 3, Y(0));
  ctx.fillStyle = "#8a919c";
  ctx.textAlign = "center";
  ctx.fillText(`strength ${lo.toFixed(2).replace(/\.?0+$/, "")} … ${hi.toFixed(2).replace(/\.?0+$/, "")}`, w / 2, h - 6);
  series(ctx, curve.points.map((p) => [X(p.strength), Y(p.detected)]), DETECTED);
  series(ctx, curve.points.map((p) => [X(p.strength), Y(p.side_effect / sideMax)]), SIDE);
  ctx.lineWidth = 1;
  if (curve.chosen !== null) line(ctx, [[X(curve.chosen), PAD.top], [X(curve.chosen), Y(0)]], CHOSEN, [4, 3]);
  if (Number.isFinite(slider)) {
    ctx.lineWidth = 2;
    line(ctx, [[X(slider), PAD.top], [X(slider), Y(0)]], SLIDER);
  }
  return { lo, hi, sideMax, chosenX: curve.chosen === null ? null : X(curve.chosen), sliderX: Number.isFinite(slider) ? X(slider) : null };
}

/** One line under the curve: the chosen strength and its rule, and the figures at the slider. */
export function curveText(curve, slider) {
  const parts = [];
  if (curve.chosen !== null) parts.push(`chosen ${curve.chosen}${curve.rule ? ` (${curve.rule})` : ""}`);
  const s = Number.isFinite(slider) ? slider : curve.chosen;
  const det = valueAt(curve, s, "detected"), side = valueAt(curve, s, "side_effect");
  if (det !== null) parts.push(`at ${s}: detected ${(100 * det).toFixed(0)}%, side effect ${side.toFixed(4)}`);
  else if (Number.isFinite(s)) parts.push(`at ${s}: outside the measured strengths`);
  return parts.join(" · ");
}

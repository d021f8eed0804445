// Soft masks: R×R Uint8Array alpha (0..255) at image resolution, as service/engine/regions.py.

export function emptyMask(r) {
  return new Uint8Array(r * r);
}

export function isEmpty(mask) {
  for (let i = 0; i < mask.length; i++) if (mask[i]) return false;
  return true;
}

/** The soft mask of a region {box} or {mask}. */
export function regionAlpha(region, r) {
  if (region.mask) return region.mask;
  const m = emptyMask(r);
  const [x0, y0, x1, y1] = region.box;
  for (let y = Math.max(0, y0); y < Math.min(r, y1); y++) m.fill(255, y * r + Math.max(0, x0), y * r + Math.min(r, x1));
  return m;
}

export function regionEmpty(region, r) {
  if (!region) return true;
  if (region.box) {
    const [x0, y0, x1, y1] = region.box;
    return !(x1 > x0 && y1 > y0);
  }
  return isEmpty(region.mask);
}

/** A soft disc at (cx, cy) in image pixels: paint raises alpha, erase lowers it. */
export function stamp(mask, r, cx, cy, radius, erase) {
  const feather = Math.max(1, radius * 0.5);
  const x0 = Math.max(0, Math.floor(cx - radius - 1)), x1 = Math.min(r - 1, Math.ceil(cx + radius + 1));
  const y0 = Math.max(0, Math.floor(cy - radius - 1)), y1 = Math.min(r - 1, Math.ceil(cy + radius + 1));
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const d = Math.hypot(x + 0.5 - cx, y + 0.5 - cy);
      const a = Math.min(1, Math.max(0, (radius - d) / feather + 0.5));
      if (a <= 0) continue;
      const i = y * r + x;
      if (erase) mask[i] = Math.min(mask[i], Math.round((1 - a) * 255));
      else mask[i] = Math.max(mask[i], Math.round(a * 255));
    }
  }
}

/** Tight box [x0, y0, x1, y1] (end exclusive) of the nonzero pixels, or null. */
export function bbox(mask, r) {
  let x0 = r, y0 = r, x1 = -1, y1 = -1;
  for (let y = 0; y < r; y++) {
    for (let x = 0; x < r; x++) {
      if (mask[y * r + x]) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  return x1 < 0 ? null : [x0, y0, x1 + 1, y1 + 1];
}

export function regionBBox(region, r) {
  return region.box ? region.box.slice() : bbox(region.mask, r);
}

/** Centre of mass (x, y) of a soft mask, in pixels. */
export function center(mask, r) {
  let s = 0, sx = 0, sy = 0;
  for (let y = 0; y < r; y++) {
    for (let x = 0; x < r; x++) {
      const a = mask[y * r + x];
      s += a;
      sx += a * (x + 0.5);
      sy += a * (y + 0.5);
    }
  }
  return s ? [sx / s, sy / s] : [r / 2, r / 2];
}

/** The region moved by (dx, dy) pixels (a box stays a box). */
export function translate(region, r, dx, dy) {
  if (region.box) {
    const [x0, y0, x1, y1] = region.box;
    return { box: [x0 + dx, y0 + dy, x1 + dx, y1 + dy] };
  }
  const out = emptyMask(r);
  for (let y = 0; y < r; y++) {
    const sy = y - dy;
    if (sy < 0 || sy >= r) continue;
    for (let x = 0; x < r; x++) {
      const sx = x - dx;
      if (sx >= 0 && sx < r) out[y * r + x] = region.mask[sy * r + sx];
    }
  }
  return { mask: out };
}

async function pump(bytes, stream) {
  const piped = new Blob([bytes]).stream().pipeThrough(stream);
  return new Uint8Array(await new Response(piped).arrayBuffer());
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

/** {"encoding": "zlib-base64-u8", "size": [R, R], "data": ...}: CompressionStream("deflate") is zlib. */
export async function encodeMask(mask, r) {
  const z = await pump(mask, new CompressionStream("deflate"));
  return { encoding: "zlib-base64-u8", size: [r, r], data: toBase64(z) };
}

export async function decodeMask(obj, r, field) {
  if (!obj || obj.encoding !== "zlib-base64-u8") throw new Error(`${field}: unknown mask encoding ${obj && obj.encoding}`);
  const [h, w] = obj.size || [];
  if (h !== r || w !== r) throw new Error(`${field}: mask is ${h}x${w}, the model draws ${r}x${r}`);
  const raw = Uint8Array.from(atob(obj.data), (c) => c.charCodeAt(0));
  const out = await pump(raw, new DecompressionStream("deflate"));
  if (out.length !== r * r) throw new Error(`${field}: mask holds ${out.length} bytes, expected ${r * r}`);
  return out;
}

/** The edit-spec JSON form of a region: {seed, box} or {seed, mask}. */
export async function regionToSpec(region, r) {
  if (region.box) return { seed: region.seed, box: region.box.slice() };
  return { seed: region.seed, mask: await encodeMask(region.mask, r) };
}

export async function regionFromSpec(obj, r, field) {
  if (!obj || typeof obj !== "object" || !Number.isInteger(obj.seed)) throw new Error(`${field}: needs an integer seed`);
  if (Array.isArray(obj.box)) return { seed: obj.seed, box: obj.box.map(Number) };
  if (obj.mask) return { seed: obj.seed, mask: await decodeMask(obj.mask, r, `${field}.mask`) };
  throw new Error(`${field}: needs a box or a mask`);
}

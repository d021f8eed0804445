// Bundles src/ into ../service/server/webui/: index.html, assets/app.js, assets/app.css.
// No CDN, no external fonts: everything the page needs is in those three files.
import * as esbuild from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const src = resolve(here, "..", "src");
const out = resolve(here, "..", "..", "service", "server", "webui");
const watch = process.argv.includes("--watch");

await rm(out, { recursive: true, force: true });
await mkdir(resolve(out, "assets"), { recursive: true });
await copyFile(resolve(src, "index.html"), resolve(out, "index.html"));

const options = {
  entryPoints: { app: resolve(src, "main.js") },
  bundle: true,
  format: "esm",
  target: ["chrome110", "firefox115", "safari16.4"],
  minify: !watch,
  sourcemap: watch ? "inline" : false,
  outdir: resolve(out, "assets"),
  loader: { ".css": "css" },
  logLevel: "info",
};
if (watch) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
} else {
  await esbuild.build(options);
}

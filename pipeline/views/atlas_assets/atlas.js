"use strict";
// Client-side filtering for the atlas. A classic script, not an ES module: browsers
// refuse module scripts from file:// pages, and the atlas must open from disk.

const RESULT_LIMIT = 200;  // rendering more cards at once makes typing in the search box lag

// "0-3, 7" -> predicate on integers; "" -> null (no filter); malformed -> undefined.
function parseSpec(text) {
  text = text.trim();
  if (!text) return null;
  const ranges = [];
  for (const part of text.split(",")) {
    const match = part.trim().match(/^(\d+)(?:\s*-\s*(\d+))?$/);
    if (!match) return undefined;
    const low = Number(match[1]);
    ranges.push([low, match[2] === undefined ? low : Number(match[2])]);
  }
  return (n) => ranges.some(([low, high]) => n >= low && n <= high);
}

// The predicate typed into an input; a malformed one is flagged and filters nothing.
function specOf(id) {
  const input = document.getElementById(id);
  const spec = parseSpec(input.value);
  input.setAttribute("aria-invalid", spec === undefined ? "true" : "false");
  return spec || null;
}

// The measurement the model page sorts and filters by ("" = feature order), as a data-m-* attribute name.
function measurementOf(cell, name) {
  const text = cell.getAttribute(`data-m-${name}`);
  return text === null ? null : Number(text);
}

// Each layer's features in the order asked for: a row's cells are reordered in place, unmeasured ones last.
// Sorted, a column no longer holds one feature, so the feature header row is hidden and each thumbnail's
// title names its feature.
function sortGrid() {
  const name = document.getElementById("sort-by").value;
  const descending = document.getElementById("sort-order").value === "descending";
  for (const table of document.querySelectorAll("table.grid")) {
    table.tHead.hidden = name !== "";
    for (const row of table.tBodies[0].rows) {
      const cells = Array.from(row.querySelectorAll("td[data-feature]"));
      cells.sort((a, b) => {
        if (name === "") return Number(a.dataset.feature) - Number(b.dataset.feature);
        const x = measurementOf(a, name), y = measurementOf(b, name);
        if (x === null || y === null) return (x === null) - (y === null);
        return descending ? y - x : x - y;
      });
      row.append(...cells);
    }
  }
  filterGrid();
}

function filterGrid() {
  const layer = specOf("filter-layer");
  const feature = specOf("filter-feature");
  const name = document.getElementById("sort-by").value || "activation";
  const minimumInput = document.getElementById("filter-min");
  const minimumText = minimumInput.value.trim();
  const minimum = minimumText === "" ? null : Number(minimumText);
  minimumInput.setAttribute("aria-invalid", Number.isNaN(minimum) ? "true" : "false");
  let shown = 0;
  for (const table of document.querySelectorAll("table.grid")) {
    for (const cell of table.querySelectorAll("[data-feature]")) {
      const value = cell.tagName === "TD" ? measurementOf(cell, name) : null;
      const belowMinimum = minimum !== null && !Number.isNaN(minimum) && cell.tagName === "TD"
        && (value === null || value < minimum);
      cell.hidden = (feature !== null && !feature(Number(cell.dataset.feature))) || belowMinimum;
    }
    for (const row of table.tBodies[0].rows) {
      row.hidden = layer !== null && !layer(Number(row.dataset.layer));
      if (!row.hidden) {
        for (const cell of row.cells) {
          if (!cell.hidden) shown += cell.querySelectorAll("img").length;
        }
      }
    }
  }
  document.getElementById("filter-count").textContent = `${shown} images`;
}

const THUMB_SIZE = 128;  // the thumbnails' own size: shown 1:1, so the browser does not average their texture

function resultCard(model, record) {
  // `slug` is the file name the atlas gave the record (its key when safe): never raw store text.
  const [slug, layer, feature, target, activation, label] = record;
  const link = document.createElement("a");
  link.className = "card";
  link.href = `features/${encodeURIComponent(slug)}.html`;
  const image = document.createElement("img");
  image.src = `thumbs/${encodeURIComponent(slug)}.png`;
  image.loading = "lazy";
  image.width = image.height = THUMB_SIZE;
  image.alt = `${model} layer ${layer} feature ${feature}`;
  const caption = document.createElement("span");
  caption.textContent = `${model} · L${layer} · f${feature} · ${target} · ${activation}` + (label ? ` · ${label}` : "");
  link.append(image, caption);
  return link;
}

// The search index comes in parts (search/<part>.js, one model's layer, a few hundred features each),
// loaded when a search needs them: as scripts, since fetch() of a local file is refused under file://.
const loadingParts = new Map();

function loadPart(stem) {
  if (!loadingParts.has(stem)) {
    loadingParts.set(stem, new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = `search/${encodeURIComponent(stem)}.js`;
      script.onload = () => resolve(window.ATLAS_PARTS[stem]);
      script.onerror = () => reject(new Error(`the search index part ${script.src} did not load`));
      document.head.append(script);
    }));
  }
  return loadingParts.get(stem);
}

// Whether some (every) feature from first to last passes a feature filter.
function someIn(spec, first, last) {
  for (let f = first; f <= last; f++) if (spec(f)) return true;
  return false;
}

function everyIn(spec, first, last) {
  for (let f = first; f <= last; f++) if (!spec(f)) return false;
  return true;
}

let latestSearch = 0;  // a search still loading parts gives way to a newer one

async function search() {
  const run = ++latestSearch;
  const index = window.ATLAS_INDEX;
  const model = document.getElementById("search-model").value.trim().toLowerCase();
  const family = document.getElementById("search-family").value;
  const layer = specOf("search-layer");
  const feature = specOf("search-feature");
  const modelMatches = (name, fam) => (!model || name.toLowerCase().includes(model)) && (!family || fam === family);

  for (const item of document.querySelectorAll("li.model")) {
    const fam = item.closest("section.family").querySelector("h2").textContent;
    item.hidden = !modelMatches(item.dataset.model, fam);
  }
  const results = document.getElementById("search-results");
  const count = document.getElementById("search-count");
  if (layer === null && feature === null) {  // names alone narrow the model list; no need for cards
    results.replaceChildren();
    count.textContent = "";
    return;
  }
  const parts = index.parts.filter(([, m, l, first, last]) => modelMatches(...index.models[m])
    && (layer === null || layer(l)) && (feature === null || someIn(feature, first, last)));
  const shown = [];
  let matched = 0;
  let exact = true;
  for (const [stem, m, , first, last, records] of parts) {
    const whole = feature === null || everyIn(feature, first, last);
    if (shown.length >= RESULT_LIMIT) {  // enough cards: count the rest without loading what is not needed
      if (whole) matched += records;
      else exact = false;
      continue;
    }
    const found = (await loadPart(stem)).filter(([, , f]) => feature === null || feature(f));
    if (run !== latestSearch) return;
    matched += found.length;
    shown.push(...found.slice(0, RESULT_LIMIT - shown.length).map((record) => resultCard(index.models[m][0], record)));
  }
  results.replaceChildren(...shown);
  const total = exact ? `${matched} matches` : `at least ${matched} matches`;
  count.textContent = matched > RESULT_LIMIT || !exact ? `${total}, showing the first ${RESULT_LIMIT}` : total;
}

document.addEventListener("DOMContentLoaded", () => {
  // The filter forms filter in place; Enter must not submit (reload) them. No inline handlers in the pages.
  for (const form of document.querySelectorAll("form.filters")) {
    form.addEventListener("submit", (event) => event.preventDefault());
  }
  if (document.getElementById("grid-filter")) {
    for (const id of ["filter-layer", "filter-feature", "filter-min"]) {
      document.getElementById(id).addEventListener("input", filterGrid);
    }
    for (const id of ["sort-by", "sort-order"]) {
      document.getElementById(id).addEventListener("change", sortGrid);
    }
  }
  if (document.getElementById("search")) {
    for (const id of ["search-model", "search-layer", "search-feature"]) {
      document.getElementById(id).addEventListener("input", search);
    }
    // A select changed from the keyboard or by script may fire only "change". Text inputs
    // must not listen to it: it fires on blur, and re-rendering then would swallow the
    // click on a result that caused the blur.
    document.getElementById("search-family").addEventListener("change", search);
  }
});

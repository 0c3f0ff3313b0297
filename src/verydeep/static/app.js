// The page of `verydeep serve`: send an image to POST /api/look and draw what comes back.
// Everything is built with textContent (never markup from the server) and nothing leaves this server.
"use strict";

const $ = (selector) => document.querySelector(selector);
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const state = { info: null, file: null, sequence: 0, looks: 0 };

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

function percent(p) { return (100 * p).toFixed(2) + "%"; }
function seconds(s) { return s < 10 ? s.toFixed(2) + " s" : s.toFixed(1) + " s"; }
function millions(n) { return n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n.toLocaleString("en"); }

function setStatus(text, kind) {
  $("#status").textContent = text;
  document.body.dataset.state = kind;
}

function showMessage(text) {
  const box = $("#message");
  box.textContent = text;
  box.hidden = !text;
}

// ---- the nets, once --------------------------------------------------------------------------

function describeNet(net) {
  const pre = net.preprocess;
  const rows = [
    ["source", net.source],
    ["configuration", `${net.model} (Table 1)` + (net.width && net.width !== 1 ? `, width x${net.width}` : "")],
    ["parameters", millions(net.parameters)],
    ["classes", String(net.classes)],
    ["crop", `${net.crop} x ${net.crop}`],
    ["training scale S", net.train_scale ? net.train_scale.join(" to ") : "unknown"],
    ["test scales Q", net.scales.join(", ")],
    ["input", `${pre.channels} on 0 to ${pre.value_scale}, mean ${pre.mean.map((v) => +v.toFixed(4)).join(", ")}` +
              `, std ${pre.std.map((v) => +v.toFixed(4)).join(", ")}`],
  ];
  const list = element("dl");
  for (const [term, value] of rows) list.append(element("dt", { text: term }), element("dd", { text: value }));
  return element("article", { class: "net" }, element("h3", { text: net.name }), list);
}

function showInfo(info) {
  state.info = info;
  const about = $("#nets");
  about.replaceChildren(...info.nets.map(describeNet));
  for (const loc of info.localizers) {
    const list = element("dl");
    for (const [term, value] of [["source", loc.source], ["task", loc.task], ["crop", String(loc.crop)],
                                 ["training scale S", JSON.stringify(loc.scale)]]) {
      list.append(element("dt", { text: term }), element("dd", { text: value }));
    }
    about.append(element("article", { class: "net" }, element("h3", { text: "localisation net" }), list));
  }
  $("#device").textContent = `${info.device}, ${info.precision}` +
    (info.fusion ? "; the nets are fused by averaging their posteriors (Sec. 4.4)" : "");
  $("#scales").placeholder = info.nets.length === 1 ? info.nets[0].scales.join(",") : "each net's own";
  $("#topk").max = info.limits.topk;
  if (info.examples.length) {
    const row = $("#examples");
    info.examples.forEach((name, index) => {
      const button = element("button", { type: "button", title: name },
                             element("img", { src: `/api/examples/${index}`, alt: name }));
      button.addEventListener("click", () => lookAtExample(index, name));
      row.append(button);
    });
    row.hidden = false;
  }
  setStatus("Drop or choose an image.", "ready");
}

// ---- an image --------------------------------------------------------------------------------

function topTable(top, className) {
  const table = element("table", { class: className });
  for (const entry of top) {
    const bar = element("span");
    bar.style.width = percent(entry.probability);
    const row = element("tr", { "data-rank": String(entry.rank) },
      element("td", { class: "rank", text: String(entry.rank) }),
      element("td", { class: "name", text: entry.name }),
      element("td", { class: "class", text: entry.name === entry.class ? "" : entry.class }),
      element("td", { class: "bar" }, bar),
      element("td", { class: "prob", text: percent(entry.probability) }));
    table.append(row);
  }
  return table;
}

function saliencyFigure(result, index, look) {
  const best = result.prediction.predictions[0].top[0];
  const base = element("img", { src: look.preview, alt: "the image" });
  const map = element("img", { class: "over map", id: `saliency-${index}`, src: result.saliency,
                               alt: `class saliency map of ${best.name}` });
  const slider = element("input", { type: "range", min: "0", max: "1", step: "0.05", value: "1",
                                    "aria-label": "saliency map over the image" });
  slider.addEventListener("input", () => { map.style.opacity = slider.value; });
  return element("figure", { class: "saliency" }, element("div", { class: "stage" }, base, map),
    element("figcaption", { text: `Where it looks: |dS/dI| of "${best.name}", max over colour, ` +
      `at Q = ${Math.min(...result.prediction.scales)} (Simonyan et al. 2014). Slide to see the image.` }), slider);
}

function netCard(result, index, look) {
  const prediction = result.prediction;
  const meta = `Q = ${prediction.scales.join(", ")}; ${prediction.protocol}; ${seconds(result.seconds)}`;
  return element("article", { class: "net", "data-net": String(index) },
    element("h3", { text: result.name }), topTable(prediction.predictions[0].top, "top"),
    element("p", { class: "meta", text: meta }), saliencyFigure(result, index, look));
}

function drawBoxes(look) {
  const overlay = $("#boxes-overlay");
  overlay.replaceChildren();
  overlay.setAttribute("viewBox", `0 0 ${look.size[0]} ${look.size[1]}`);
  const list = $("#boxes");
  list.replaceChildren();
  if (!look.boxes) return;
  if (look.boxes.error) {
    list.append(element("p", { class: "muted", text: `No boxes: ${look.boxes.error}` }));
    return;
  }
  const table = element("table", { class: "boxes" });
  look.boxes.predictions.forEach((guess, rank) => {
    const [x0, y0, x1, y1] = guess.box;
    const colour = COLOURS[rank % COLOURS.length];
    const rect = svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: colour, class: "box" });
    const size = Math.max(10, look.size[1] / 30);
    const label = svg("text", { x: x0 + 3, y: y0 + size * (1.1 + 1.2 * rank), "font-size": size }); // stacked by rank
    label.textContent = `${rank + 1}. ${guess.class.split(",")[0]} ${guess.score.toFixed(2)}`; // "koala, koala bear": koala
    overlay.append(rect, label);
    const swatch = element("span", { text: "\u25a0" });
    swatch.style.color = colour;
    table.append(element("tr", {}, element("td", {}, swatch), element("td", { class: "name", text: guess.class }),
      element("td", { class: "prob", text: guess.score.toFixed(3) }),
      element("td", { class: "class", text: guess.box.join(", ") })));
  });
  list.append(element("h3", { text: `Boxes (protocol 2, Q = ${look.boxes.scales.join(", ")}; ` +
                                    `${seconds(look.boxes.seconds)})` }), table);
}

function showLook(look) {
  $("#picture").hidden = false;
  $("#preview").src = look.preview;
  $("#picture-caption").textContent = `${look.image}: ${look.size[0]} x ${look.size[1]} pixels`;
  drawBoxes(look);
  const cards = look.nets.map((result, index) => netCard(result, index, look));
  if (look.fusion) {
    cards.push(element("article", { class: "net fusion", "data-net": "fusion" },
      element("h3", { text: "Fusion: the nets' posteriors averaged (Sec. 4.4)" }), topTable(look.fusion, "top")));
  }
  $("#results").replaceChildren(element("h2", { text: "Top classes" }), element("div", { class: "nets" }, ...cards));
}

async function look(file) {
  state.file = file;
  const sequence = ++state.sequence;
  const limits = state.info ? state.info.limits : null;
  if (limits && file.size > limits.bytes) {
    refuse(`${file.name}: ${(file.size / 2 ** 20).toFixed(1)} MB; an image may have at most ` +
           `${limits.bytes / 2 ** 20} MB`);
    return;
  }
  const form = new FormData();
  form.append("image", file, file.name);
  for (const field of ["topk", "scales", "protocol"]) form.append(field, $(`#${field}`).value.trim());
  setStatus(`Looking at ${file.name}\u2026`, "busy");
  let response, body;
  try {
    response = await fetch("/api/look", { method: "POST", body: form });
    body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  } catch (error) {
    body = { error: `no answer from the server (${error.message})` };
  }
  if (sequence !== state.sequence) return; // a newer image was sent meanwhile
  state.looks += 1;
  document.body.dataset.looks = String(state.looks);
  if (!response || !response.ok) { refuse(body.error || "the server refused the image"); return; }
  showMessage("");
  showLook(body);
  setStatus(`${body.image}: looked at in ${seconds(body.seconds)}.`, "done");
}

function refuse(text) {
  showMessage(text);
  $("#results").replaceChildren();
  $("#picture").hidden = true;
  setStatus("Nothing shown for that file; try another image.", "error");
}

async function lookAtExample(index, name) {
  const response = await fetch(`/api/examples/${index}`);
  const blob = await response.blob();
  look(new File([blob], name, { type: blob.type }));
}

function wire() {
  const input = $("#image-input");
  input.addEventListener("change", () => {
    if (input.files.length) look(input.files[0]);
    input.value = ""; // the same file chosen again is looked at again
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) look(event.dataTransfer.files[0]);
  });
  for (const id of ["#scales", "#protocol", "#topk"]) {
    $(id).addEventListener("change", () => { if (state.file) look(state.file); });
  }
}

wire();
fetch("/api/info").then((response) => response.json()).then(showInfo)
  .catch((error) => setStatus(`The server did not describe its nets (${error.message}).`, "error"));

// The playground page: wires the API key, the job form, the init image and the job list together.

import { ApiError, apiKey, getJson, postJson, setApiKey } from "./api.js";
import { Catalog } from "./catalog.js";
import { JobForm } from "./form.js";
import { ImageInput } from "./imageinput.js";
import { JobList } from "./jobs.js";

const $ = (id) => document.getElementById(id);

function show(element, message) {
  element.hidden = !message;
  element.textContent = message;
}

function describe(err) {
  return err instanceof ApiError ? err.describe() : String(err);
}

const form = new JobForm($("generate"));
const catalog = new Catalog({ list: $("lora-list"), empty: $("loras-empty"), vae: $("vae"), vaeHelp: $("vae-help"),
  model: $("model") });
form.catalog = catalog;
$("model").addEventListener("change", () => form.useSize(catalog.chosenSize()));
const formMessage = (message) => {
  show($("form-message"), message);
  if (message) $("form-message").scrollIntoView({ block: "nearest" }); // below the fold on a phone
};
const images = new ImageInput({
  zone: $("drop-zone"), file: $("init-file"), stage: $("stage"), preview: $("init-preview"), canvas: $("mask-canvas"),
  info: $("init-info"), brush: $("brush"), brushValue: $("brush-value"), invert: $("mask-invert"),
  clear: $("mask-clear"), onError: formMessage,
});
const jobs = new JobList({
  list: $("jobs"), empty: $("jobs-empty"), jobTemplate: $("job-template"), imageTemplate: $("image-template"),
  onUseAsInit: async (blob, name) => {
    if (form.mode === "txt2img") form.mode = "img2img";
    await images.load(blob, name);
    $("generate").scrollIntoView({ block: "start" });
    $("init-file").focus({ preventScroll: true });
  },
  onReuseSeed: (seed) => form.setSeed(seed),
});

// Readiness is open (no key): it says whether a worker is up before anything is submitted.
async function showReadiness() {
  try {
    const response = await fetch("readyz");
    const ready = await response.json();
    const workers = `${ready.workers} ${ready.workers === 1 ? "worker" : "workers"}`;
    $("server-status").textContent = ready.ready ? `Ready: ${workers}` : `Not ready: ${ready.reason ?? workers}`;
    $("server-status").dataset.ready = String(ready.ready);
  } catch (err) {
    $("server-status").textContent = `The server cannot be reached (${err.message})`;
    $("server-status").dataset.ready = "false";
  }
}

// The server's limits need the key when auth is on, so asking for them also checks the key.
async function loadLimits() {
  try {
    const limits = await getJson("v1/limits");
    form.applyLimits(limits);
    images.maxBytes = limits.max_image_bytes;
    show($("key-message"), "");
    await loadCatalog();
    return true;
  } catch (err) {
    show($("key-message"), describe(err));
    return false;
  }
}

// The LoRAs and the tiny VAE the live workers offer (behind the key too, like the limits).
async function loadCatalog() {
  try {
    const [loras, models] = await Promise.all([getJson("v1/loras"), getJson("v1/models")]);
    catalog.showLoras(loras.loras, form.property("LoraRequest", "scale"));
    catalog.showModels(models.models);
    form.useSize(catalog.chosenSize());
  } catch (err) {
    formMessage(`the workers' LoRAs and models cannot be read: ${describe(err)}`);
  }
}

async function submit(event) {
  event.preventDefault();
  formMessage("");
  const mode = form.mode;
  const request = form.request();
  const body = { ...request };
  const missing = images.addTo(body, mode);
  if (missing) {
    formMessage(missing);
    return;
  }
  const button = $("submit");
  if (button.disabled) return; // still sending the previous one
  button.disabled = true;
  try {
    const job = await postJson(form.endpoint(), body);
    const card = jobs.add({ id: job.id, endpoint: form.endpoint(), request, hasMask: "mask" in body }, job);
    // One column (a phone): the job list is below the form, so bring the new job into view.
    if (card.getBoundingClientRect().top > window.innerHeight) card.scrollIntoView({ block: "nearest" });
  } catch (err) {
    formMessage(describe(err));
  } finally {
    button.disabled = false;
  }
}

async function start() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey($("api-key").value.trim());
    if (!(await loadLimits())) return;
    jobs.retryUnavailable();
    $("key-help").textContent = apiKey() ? "Key accepted; kept in this browser's local storage."
      : "No key: fine while the server asks for none.";
  });
  $("generate").addEventListener("submit", submit);
  $("generate").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("generate").requestSubmit(); // from the prompt
  });
  $("seed-random").addEventListener("click", () => form.setSeed(null));
  $("seed-reuse").addEventListener("click", () => {
    const seed = jobs.lastSeed();
    if (seed === null) formMessage("no job with a seed yet");
    else form.setSeed(seed);
  });
  try {
    form.applySchema(await getJson("openapi.json"));
  } catch (err) {
    formMessage(`the request schema cannot be read: ${describe(err)}`);
  }
  await Promise.all([showReadiness(), loadLimits()]);
  jobs.restore();
  document.body.dataset.loaded = "true";
}

start();
// A page left open follows workers coming and going.
setInterval(showReadiness, 15000);

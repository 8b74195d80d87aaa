// What the live workers can run beyond the request schema: the LoRAs they can load (GET /v1/loras), the models
// they hold and whether one holds a tiny VAE (GET /v1/models), so the form offers only what a job can use.

export class Catalog {
  constructor({ list, empty, vae, vaeHelp, model }) {
    this.list = list;
    this.empty = empty;
    this.vae = vae;
    this.vaeHelp = vaeHelp;
    this.model = model;
    this.sizes = new Map(); // model name -> its native side (GET /v1/models: default_size)
  }

  // One row per LoRA: a checkbox to use it and its scale (the request's `loras[].scale`).
  showLoras(loras, scaleSchema) {
    const previous = new Map(this.chosen().map((lora) => [lora.name, lora.scale]));
    const rows = loras.map(({ name }, index) => {
      const row = document.createElement("div");
      row.className = "lora";
      const use = document.createElement("input");
      use.type = "checkbox";
      use.id = `lora-${index}`;
      use.value = name;
      use.checked = previous.has(name);
      const label = document.createElement("label");
      label.htmlFor = use.id;
      label.textContent = name;
      const scale = document.createElement("input");
      scale.type = "number";
      scale.step = "0.05";
      scale.inputMode = "decimal";
      scale.className = "lora-scale";
      scale.setAttribute("aria-label", `Scale of ${name}`);
      if (scaleSchema?.minimum !== undefined) scale.min = String(scaleSchema.minimum);
      if (scaleSchema?.maximum !== undefined) scale.max = String(scaleSchema.maximum);
      scale.value = String(previous.get(name) ?? scaleSchema?.default ?? 1);
      row.append(use, label, scale);
      return row;
    });
    this.list.replaceChildren(...rows);
    this.empty.hidden = rows.length > 0;
  }

  // The request's `model`: "default" (not sent: the deployment's default model) or one a live worker holds;
  // `vae: tiny` only where a live worker holds a tiny VAE; the full VAE is always there.
  showModels(models) {
    const previous = this.model.value;
    const names = [...new Set(models.map((model) => model.name))];
    this.sizes = new Map(models.map((model) => [model.name, model.default_size]));
    this.model.replaceChildren(new Option("default", ""), ...names.map((name) => new Option(name, name)));
    this.model.value = names.includes(previous) ? previous : "";
    const tiny = models.some((model) => model.tiny_vae);
    for (const option of this.vae.options) {
      if (option.value === "tiny") option.disabled = !tiny;
    }
    if (!tiny && this.vae.value === "tiny") this.vae.value = "full";
    this.vaeHelp.hidden = tiny;
  }

  // The native image side of the chosen model (SDXL 1024), or, for "default", the one side all live models share;
  // null when that is not known.
  chosenSize() {
    const name = this.chosenModel();
    if (name) return this.sizes.get(name) ?? null;
    const sides = new Set(this.sizes.values());
    return sides.size === 1 ? [...sides][0] : null;
  }

  // The request's `model`, or null for the deployment's default.
  chosenModel() {
    return this.model.value || null;
  }

  // The request's `loras`: the checked rows, in the order listed.
  chosen() {
    return [...this.list.querySelectorAll(".lora")]
      .filter((row) => row.querySelector('input[type="checkbox"]').checked)
      .map((row) => ({ name: row.querySelector('input[type="checkbox"]').value,
        scale: Number(row.querySelector(".lora-scale").value || 1) }));
  }
}

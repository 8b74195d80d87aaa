// The init image (dropped, picked, or taken from a result) and the inpaint mask painted over it in a canvas.
// The canvas has the image's own size, so the mask sent has it too: painted pixels become white (repaint), the
// rest black (keep); the stroke's opacity becomes grey along its edge.

// Only the mask's alpha counts: the colour is there to see the mask over the image.
const MASK_RGB = [255, 0, 110];
const MASK_COLOR = `rgb(${MASK_RGB.join(", ")})`;

export class ImageInput {
  constructor({ zone, file, stage, preview, canvas, info, brush, brushValue, invert, clear, onError }) {
    Object.assign(this, { zone, file, stage, preview, canvas, info, brush, brushValue, onError });
    this.dataUrl = null;
    this.maxBytes = null;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.painted = false;
    file.addEventListener("change", () => file.files[0] && this.load(file.files[0]));
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      const dropped = e.dataTransfer.files[0];
      if (dropped) this.load(dropped);
    });
    brush.addEventListener("input", () => this.showBrush());
    this.showBrush();
    invert.addEventListener("click", () => this.invertMask());
    clear.addEventListener("click", () => this.clearMask());
    this.listenForPaint();
  }

  showBrush() {
    this.brushValue.textContent = `${this.brush.value} px`;
  }

  // Takes a File or Blob; the mask starts empty at the image's size.
  async load(blob, name = blob.name || "image") {
    if (this.maxBytes !== null && blob.size > this.maxBytes) {
      this.onError(`${name} is ${blob.size} bytes; this server takes images of at most ${this.maxBytes} bytes`);
      return;
    }
    const dataUrl = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
    const previous = this.preview.src;
    this.preview.src = dataUrl;
    try {
      await this.preview.decode();
    } catch {
      this.preview.src = previous;
      this.onError(`${name} is not an image this browser can show`);
      return;
    }
    this.dataUrl = dataUrl;
    this.canvas.width = this.preview.naturalWidth;
    this.canvas.height = this.preview.naturalHeight;
    this.clearMask();
    this.stage.hidden = false;
    this.info.hidden = false;
    this.info.textContent = `${name}: ${this.preview.naturalWidth} × ${this.preview.naturalHeight}`;
  }

  listenForPaint() {
    let last = null;
    const at = (e) => {
      const box = this.canvas.getBoundingClientRect();
      return [(e.clientX - box.left) * (this.canvas.width / box.width),
        (e.clientY - box.top) * (this.canvas.height / box.height)];
    };
    const paint = (from, to) => {
      const c = this.context;
      c.strokeStyle = MASK_COLOR;
      c.lineWidth = Number(this.brush.value);
      c.lineCap = "round";
      c.lineJoin = "round";
      c.beginPath();
      c.moveTo(...from);
      c.lineTo(...to);
      c.stroke();
      this.painted = true;
    };
    this.canvas.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      this.canvas.setPointerCapture(e.pointerId);
      last = at(e);
      paint(last, last);
    });
    this.canvas.addEventListener("pointermove", (e) => {
      if (last === null) return;
      const point = at(e);
      paint(last, point);
      last = point;
    });
    for (const end of ["pointerup", "pointercancel"]) this.canvas.addEventListener(end, () => { last = null; });
  }

  clearMask() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
  }

  invertMask() {
    const { width, height } = this.canvas;
    if (!width || !height) return;
    const pixels = this.context.getImageData(0, 0, width, height);
    const [r, g, b] = MASK_RGB;
    for (let i = 0; i < pixels.data.length; i += 4) {
      pixels.data.set([r, g, b, 255 - pixels.data[i + 3]], i);
    }
    this.context.putImageData(pixels, 0, 0);
    this.painted = true;
  }

  // The mask as a PNG data URL: the painted alpha as grey on black.
  maskDataUrl() {
    const { width, height } = this.canvas;
    const pixels = this.context.getImageData(0, 0, width, height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const alpha = pixels.data[i + 3];
      pixels.data.set([alpha, alpha, alpha, 255], i);
    }
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    out.getContext("2d").putImageData(pixels, 0, 0);
    return out.toDataURL("image/png");
  }

  // Adds the image (and for inpaint, or outpaint with a painted mask, the mask) to a request body; an error
  // message when the mode needs an image and none is loaded.
  addTo(body, mode) {
    if (mode === "txt2img") return null;
    if (this.dataUrl === null) return "pick or drop an init image first";
    body.image = this.dataUrl;
    if (mode === "inpaint" || (mode === "outpaint" && this.painted)) body.mask = this.maskDataUrl();
    return null;
  }
}

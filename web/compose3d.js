// Compose3D frontend extension. ComfyUI serves this folder (WEB_DIRECTORY) and loads every .js in it.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "Compose3D.core",
});

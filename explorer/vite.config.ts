import { defineConfig } from "vite";

// One script and one stylesheet with fixed names, which interpql serves from its own package.
export default defineConfig({
  build: {
    outDir: "../interpql/static/explore",
    emptyOutDir: true,
    rollupOptions: {
      input: "src/main.ts",
      output: {
        entryFileNames: "explore.js",
        assetFileNames: "explore[extname]",
        chunkFileNames: "explore-[name].js",
      },
    },
  },
});
